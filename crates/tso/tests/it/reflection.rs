//! gRPC server reflection on the client port of a real `tso serve`: a reflection client lists
//! the public services and fetches their descriptors, with no `.proto` at hand (what grpcurl
//! and similar tools do); the internal packages (raft, admin, etcd) are not listed.

use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

use crate::common;

use common::Server;

async fn ask(addr: &str, request: MessageRequest) -> MessageResponse {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("ServerReflectionInfo")
        .into_inner();
    let reply: ServerReflectionResponse = replies
        .message()
        .await
        .expect("a reply")
        .expect("one message");
    reply.message_response.expect("a response")
}

#[tokio::test]
async fn reflection_lists_the_public_services_and_serves_their_descriptors() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let MessageResponse::ListServicesResponse(list) =
        ask(&server.addr, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "tsoracle.v1.TsoService",
        "tso.stream.v1.TsoStream",
        "tso.ops.v1.Ops",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.starts_with("tso.raft")
            || n.starts_with("tso.admin")
            || n.starts_with("etcdserverpb")),
        "internal packages listed: {names:?}"
    );
    let MessageResponse::FileDescriptorResponse(files) = ask(
        &server.addr,
        MessageRequest::FileContainingSymbol("tsoracle.v1.TsoService".into()),
    )
    .await
    else {
        panic!("not a file descriptor");
    };
    let all: Vec<u8> = files.file_descriptor_proto.concat();
    let text = String::from_utf8_lossy(&all);
    for method in ["GetTs", "GetSeq", "AcquireLease"] {
        assert!(
            text.contains(method),
            "{method} missing from the descriptor"
        );
    }
}
