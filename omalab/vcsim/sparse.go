package main

// Sparse raw-image helpers: data extents via SEEK_DATA/SEEK_HOLE, sparse copies, block diffs.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"sort"

	"golang.org/x/sys/unix"
)

// extent is a byte range [Start, Start+Length).
type extent struct {
	Start  int64
	Length int64
}

func (e extent) end() int64 { return e.Start + e.Length }

// dataExtents returns the data (allocated) extents of f within [from, size), in order.
func dataExtents(f *os.File, from, size int64) ([]extent, error) {
	var out []extent
	fd := int(f.Fd())
	off := from
	for off < size {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // no data after off
				break
			}
			return nil, fmt.Errorf("SEEK_DATA %s@%d: %w", f.Name(), off, err)
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("SEEK_HOLE %s@%d: %w", f.Name(), data, err)
		}
		if hole > size {
			hole = size
		}
		out = append(out, extent{data, hole - data})
		off = hole
	}
	return out, nil
}

// roundExtents rounds extents out to block boundaries (clipped to size) and merges
// overlapping/adjacent ones.
func roundExtents(in []extent, block, size int64) []extent {
	var out []extent
	for _, e := range in {
		s := e.Start / block * block
		end := (e.end() + block - 1) / block * block
		if end > size {
			end = size
		}
		if end <= s {
			continue
		}
		if n := len(out); n > 0 && s <= out[n-1].end() {
			if end > out[n-1].end() {
				out[n-1].Length = end - out[n-1].Start
			}
			continue
		}
		out = append(out, extent{s, end - s})
	}
	return out
}

// mergeExtents sorts and merges extents (touching ones are joined).
func mergeExtents(in []extent) []extent {
	if len(in) == 0 {
		return nil
	}
	s := append([]extent(nil), in...)
	sort.Slice(s, func(i, j int) bool { return s[i].Start < s[j].Start })
	out := []extent{s[0]}
	for _, e := range s[1:] {
		last := &out[len(out)-1]
		if e.Start <= last.end() {
			if e.end() > last.end() {
				last.Length = e.end() - last.Start
			}
			continue
		}
		out = append(out, e)
	}
	return out
}

// sparseCopy copies src to a new file dst of the same size, writing only src's data
// extents (holes stay holes). It tries a reflink (FICLONE) first.
func sparseCopy(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		out.Close()
		if !ok {
			os.Remove(dst)
		}
	}()
	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
		ok = true
		return nil
	}
	size := st.Size()
	if err := out.Truncate(size); err != nil {
		return err
	}
	exts, err := dataExtents(in, 0, size)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for _, e := range exts {
		off := e.Start
		for off < e.end() {
			n := int64(len(buf))
			if rem := e.end() - off; rem < n {
				n = rem
			}
			// copy_file_range keeps the copy in the kernel; fall back to read/write.
			roff, woff := off, off
			c, cerr := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(n), 0)
			if cerr != nil || c <= 0 {
				r, rerr := in.ReadAt(buf[:n], off)
				if rerr != nil && rerr != io.EOF {
					return rerr
				}
				if r == 0 {
					return fmt.Errorf("short read %s@%d", src, off)
				}
				if _, werr := out.WriteAt(buf[:r], off); werr != nil {
					return werr
				}
				c = r
			}
			off += int64(c)
		}
	}
	ok = true
	return nil
}

// readBlock reads [off, off+len(buf)) from f, zero-filling past EOF.
func readBlock(f *os.File, off int64, buf []byte) error {
	n, err := f.ReadAt(buf, off)
	if err != nil && err != io.EOF {
		return err
	}
	for i := n; i < len(buf); i++ {
		buf[i] = 0
	}
	return nil
}

// diffBlocks returns the block-granular extents where files a and b differ (over
// [0, max(size a, size b))). Only blocks that are allocated in either file are read.
func diffBlocks(a, b string, block int64) ([]extent, error) {
	fa, err := os.Open(a)
	if err != nil {
		return nil, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return nil, err
	}
	defer fb.Close()
	sa, _ := fa.Stat()
	sb, _ := fb.Stat()
	size := sa.Size()
	if sb.Size() > size {
		size = sb.Size()
	}
	ea, err := dataExtents(fa, 0, sa.Size())
	if err != nil {
		return nil, err
	}
	eb, err := dataExtents(fb, 0, sb.Size())
	if err != nil {
		return nil, err
	}
	cand := roundExtents(mergeExtents(append(ea, eb...)), block, size)
	ba := make([]byte, block)
	bb := make([]byte, block)
	var out []extent
	for _, e := range cand {
		for off := e.Start; off < e.end(); off += block {
			n := block
			if rem := size - off; rem < n {
				n = rem
			}
			if err := readBlock(fa, off, ba[:n]); err != nil {
				return nil, err
			}
			if err := readBlock(fb, off, bb[:n]); err != nil {
				return nil, err
			}
			if !bytes.Equal(ba[:n], bb[:n]) {
				if k := len(out); k > 0 && out[k-1].end() == off {
					out[k-1].Length += n
				} else {
					out = append(out, extent{off, n})
				}
			}
		}
	}
	return out, nil
}

// fillPattern writes deterministic pseudo-random data into parts of a raw disk file,
// leaving holes. Layout per 1/16 of the disk ("segment"):
//
//	seg%4 == 0: random data over the first half of the segment
//	seg%4 == 1: eight random 4 KiB..64 KiB pieces at pseudo-random offsets
//	seg%4 == 2: 128 KiB of explicitly written zeros (allocated but zero)
//	seg%4 == 3: hole
func fillPattern(path string, size int64, seed int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	rng := rand.New(rand.NewSource(seed))
	seg := size / 16
	seg = seg / 4096 * 4096
	if seg < 64*1024 {
		seg = 64 * 1024
	}
	buf := make([]byte, 1<<20)
	write := func(off, n int64, zero bool) error {
		if off+n > size {
			n = size - off
		}
		for n > 0 {
			c := int64(len(buf))
			if n < c {
				c = n
			}
			b := buf[:c]
			if zero {
				for i := range b {
					b[i] = 0
				}
			} else {
				rng.Read(b)
			}
			if _, err := f.WriteAt(b, off); err != nil {
				return err
			}
			off += c
			n -= c
		}
		return nil
	}
	for k := int64(0); k*seg < size; k++ {
		base := k * seg
		var err error
		switch k % 4 {
		case 0:
			err = write(base, seg/2, false)
		case 1:
			for i := 0; i < 8 && err == nil; i++ {
				n := int64(4096 * (1 + rng.Intn(16)))
				off := base + rng.Int63n(seg/4096)*4096
				if off+n > base+seg {
					off = base + seg - n
				}
				err = write(off, n, false)
			}
		case 2:
			n := int64(128 * 1024)
			if n > seg {
				n = seg
			}
			err = write(base, n, true)
		}
		if err != nil {
			return err
		}
	}
	return nil
}
