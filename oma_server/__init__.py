"""OMA server: the CloudStack-side gRPC API of the migration control plane."""
