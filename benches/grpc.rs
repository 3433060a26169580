//! gRPC against REST-binary serving on one agent (work in progress).

fn main() {}
