"""Thin gRPC servicers of the agent: validate, call the domain module, convert."""
