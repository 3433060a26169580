//! Compiles the Open Inference Protocol's gRPC binding (`proto/grpc_predict_v2.proto`) into
//! Rust at build time: protox (pure Rust) parses it into a descriptor set and
//! tonic-prost-build generates the messages, the server trait and a client, so a build needs
//! neither a `protoc` binary nor the network.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/grpc_predict_v2.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        // The client is for the agent's own tests and benchmark; it runs over any tonic
        // channel, so the library does not pull tonic's client transport.
        .build_client(true)
        .build_transport(false)
        // Raw tensor contents decode as `Bytes` slices of the received message rather than
        // copies into fresh `Vec`s, and a request or response clones without copying them.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(descriptors)?;
    Ok(())
}
