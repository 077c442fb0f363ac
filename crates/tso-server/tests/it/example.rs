//! Runs the embedding example, so it keeps working as documented.

#[path = "../../examples/embed.rs"]
mod embed;

#[tokio::test]
async fn the_embedding_example_serves_increasing_timestamps() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let values = embed::run(dir.path()).await.unwrap();
    assert_eq!(values.len(), 3);
    assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
}
