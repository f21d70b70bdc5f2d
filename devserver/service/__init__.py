"""The gRPC shell around the core: the only devserver package importing grpc."""
