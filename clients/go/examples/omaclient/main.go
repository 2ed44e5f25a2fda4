// Command omaclient shows the generated Go client of the OMA server at work: it logs in, prints one
// JSON line per managed VM ({"name", "status", "id"}) and, with -watch JOB_ID, follows that
// replication job, printing each progress update as one JSON line until the server ends the stream.
//
// Exit codes are omactl's: 0 success, 1 a local failure, 2 bad flags, 100+N a gRPC error with
// status N (e.g. 105 NOT_FOUND, 112 UNIMPLEMENTED, 116 UNAUTHENTICATED), 130 interrupted.
// Errors are printed to stderr as "error: <STATUS>: <message>".
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"time"

	omav1 "github.com/oma-vma/migrate/clients/go/oma/v1"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
)

const (
	exitFailure     = 1
	exitUsage       = 2
	exitRPCBase     = 100
	exitInterrupted = 130
	pageSize        = 200
)

type options struct {
	target, username, password, watch string
	timeout                           time.Duration
}

func main() {
	opts := options{}
	flag.StringVar(&opts.target, "target", envOr("OMA_TARGET", "127.0.0.1:9090"), "OMA server host:port ($OMA_TARGET replaces the default)")
	flag.StringVar(&opts.username, "username", "admin", "user to log in as")
	flag.StringVar(&opts.password, "password", "", "password (default $OMA_PASSWORD, which unlike a flag is not visible in ps)")
	flag.StringVar(&opts.watch, "watch", "", "follow the progress of this replication job")
	flag.DurationVar(&opts.timeout, "timeout", 30*time.Second, "deadline of each unary call")
	flag.Parse()
	if opts.password == "" {
		opts.password = os.Getenv("OMA_PASSWORD")
	}
	if opts.password == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: omaclient [-target host:port] [-username name] [-password pw | $OMA_PASSWORD] [-watch JOB_ID]")
		os.Exit(exitUsage)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	exitCode := run(ctx, opts)
	stop()
	os.Exit(exitCode)
}

func run(ctx context.Context, opts options) int {
	// grpc-go 1.33 (Debian) has no credentials/insecure package; WithInsecure is its plaintext option.
	conn, err := grpc.Dial(opts.target, grpc.WithInsecure())
	if err != nil {
		return report(ctx, err)
	}
	defer conn.Close()

	token, err := login(ctx, conn, opts)
	if err != nil {
		return report(ctx, err)
	}
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	if err := printContexts(ctx, conn, opts.timeout); err != nil {
		return report(ctx, err)
	}
	if opts.watch != "" {
		if err := printProgress(ctx, conn, opts.watch); err != nil {
			return report(ctx, err)
		}
	}
	return 0
}

func login(ctx context.Context, conn *grpc.ClientConn, opts options) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	request := &omav1.LoginRequest{Username: opts.username, Password: opts.password}
	response, err := omav1.NewAuthServiceClient(conn).Login(ctx, request)
	if err != nil {
		return "", err
	}
	return response.GetToken(), nil
}

// printContexts writes {"name", "status", "id"} per VM context, walking every page of the list.
func printContexts(ctx context.Context, conn *grpc.ClientConn, timeout time.Duration) error {
	contexts := omav1.NewVMContextServiceClient(conn)
	lines := json.NewEncoder(os.Stdout)
	request := &omav1.ListVMContextsRequest{PageSize: pageSize}
	for {
		callCtx, cancel := context.WithTimeout(ctx, timeout)
		response, err := contexts.ListVMContexts(callCtx, request)
		cancel()
		if err != nil {
			return err
		}
		for _, vm := range response.GetVmContexts() {
			line := struct {
				Name   string `json:"name"`
				Status string `json:"status"`
				ID     string `json:"id"`
			}{vm.GetVmName(), vm.GetCurrentStatus(), vm.GetContextId()}
			if err := lines.Encode(line); err != nil {
				return err
			}
		}
		if response.GetNextPageToken() == "" {
			return nil
		}
		request.PageToken = response.GetNextPageToken()
	}
}

// printProgress writes each ReplicationProgress of the job as one JSON line (proto field names)
// until the server ends the stream, which it does after the job's terminal update.
func printProgress(ctx context.Context, conn *grpc.ClientConn, jobID string) error {
	request := &omav1.WatchReplicationProgressRequest{JobId: jobID}
	stream, err := omav1.NewProgressServiceClient(conn).WatchReplicationProgress(ctx, request)
	if err != nil {
		return err
	}
	marshal := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}
	for {
		update, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		line, err := marshal.Marshal(update.GetProgress())
		if err != nil {
			return err
		}
		fmt.Println(string(line))
	}
}

// report prints the error and returns the exit code for it.
func report(ctx context.Context, err error) int {
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "interrupted")
		return exitInterrupted
	}
	st, ok := status.FromError(err)
	if !ok {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return exitFailure
	}
	fmt.Fprintf(os.Stderr, "error: %s: %s\n", code.Code_name[int32(st.Code())], st.Message())
	return exitRPCBase + int(st.Code())
}

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}
