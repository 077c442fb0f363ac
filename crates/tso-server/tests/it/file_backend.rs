//! The file backend: the conformance suite, and what it does with locks, damage and new
//! directories. Real files and fsync in temporary directories.

use crate::common;

use std::fs;
use std::path::Path;

use common::HighWaterCalls;
use tso_core::Epoch;
use tso_server::backend::file::{self, FileBackend, FileError};
use tso_server::backend::{Backend, BackendError, Leadership, conformance};

#[tokio::test]
async fn conformance_suite() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    conformance::run_all(|| {
        let path = path.clone();
        async move { FileBackend::open(&path).unwrap() }
    })
    .await;
}

#[test]
fn creates_nested_directories() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/c");
    let backend = FileBackend::open(&nested).unwrap();
    assert!(nested.join("high-water").exists());
    assert_eq!(backend.epoch(), Epoch::new(1));
}

#[test]
fn epoch_grows_on_every_start() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let epochs: Vec<Epoch> = (0..3)
        .map(|_| FileBackend::open(dir.path()).unwrap().epoch())
        .collect();
    assert_eq!(epochs, [Epoch::new(1), Epoch::new(2), Epoch::new(3)]);
    let backend = FileBackend::open(dir.path()).unwrap();
    assert_eq!(
        *backend.leadership().borrow(),
        Leadership::Leader {
            epoch: Epoch::new(4)
        }
    );
}

#[test]
fn a_second_open_of_a_locked_directory_fails_at_once() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let _held = FileBackend::open(dir.path()).unwrap();
    let err = FileBackend::open(dir.path())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, FileError::Locked { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by another tso process"),
        "{err}"
    );
}

#[tokio::test]
async fn a_persisted_value_survives_reopen() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    backend
        .raise_high_water(123_456, backend.epoch())
        .await
        .unwrap();
    drop(backend);
    let backend = FileBackend::open(dir.path()).unwrap();
    assert_eq!(backend.high_water_ms().await.unwrap(), 123_456);
}

#[tokio::test]
async fn a_stale_epoch_is_fenced() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    let err = backend
        .raise_high_water(5, Epoch::new(99))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BackendError::Fenced {
            expected: Epoch::new(99),
            current: backend.epoch()
        }
    );
}

/// Every kind of damage stops the open with an error that names the file and the problem.
#[tokio::test]
async fn damaged_records_are_refused_never_reset() {
    let _turn = crate::common::topic(module_path!());
    let damages: [(&str, Damage); 6] = [
        ("bit flip in the value", |b| b[9] ^= 0x10),
        ("bit flip in the checksum", |b| b[27] ^= 0x01),
        ("truncated", |b| b.truncate(20)),
        ("empty", |b| b.clear()),
        ("extra byte", |b| b.push(0)),
        ("wrong magic", |b| b[0..4].copy_from_slice(b"XXXX")),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        seed(dir.path(), 777_000).await;
        let record = dir.path().join("high-water");
        let mut bytes = fs::read(&record).unwrap();
        damage(&mut bytes);
        fs::write(&record, &bytes).unwrap();
        let err = FileBackend::open(dir.path())
            .err()
            .unwrap_or_else(|| panic!("{what}: open must fail"));
        let msg = err.to_string();
        assert!(matches!(err, FileError::Damaged { .. }), "{what}: {msg}");
        assert!(
            msg.contains("high-water"),
            "{what}: the error names the file: {msg}"
        );
        assert_eq!(
            fs::read(&record).unwrap(),
            bytes,
            "{what}: the damaged file is left as it was"
        );
    }
}

#[test]
fn wrong_version_is_refused_with_its_number() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    drop(FileBackend::open(dir.path()).unwrap());
    let record = dir.path().join("high-water");
    let mut bytes = fs::read(&record).unwrap();
    bytes[4] = 9;
    fs::write(&record, &bytes).unwrap();
    let msg = FileBackend::open(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("unsupported record version 9"), "{msg}");
}

#[test]
fn a_leftover_temp_file_is_ignored() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    drop(FileBackend::open(dir.path()).unwrap());
    fs::write(dir.path().join("high-water.tmp"), b"half-written garbage").unwrap();
    FileBackend::open(dir.path()).unwrap();
    assert!(!dir.path().join("high-water.tmp").exists());
}

#[tokio::test]
async fn init_seeds_a_fresh_directory_and_refuses_to_overwrite() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    file::init(dir.path(), 1_900_000_000_000).unwrap();
    let err = file::init(dir.path(), 5).unwrap_err();
    assert!(matches!(err, FileError::AlreadyInitialized { .. }), "{err}");
    let backend = FileBackend::open(dir.path()).unwrap();
    assert_eq!(backend.high_water_ms().await.unwrap(), 1_900_000_000_000);
    drop(backend);
    assert!(matches!(
        file::init(dir.path(), 5),
        Err(FileError::AlreadyInitialized { .. })
    ));
    let fresh = tempfile::tempdir().unwrap();
    assert!(matches!(
        file::init(fresh.path(), u64::MAX),
        Err(FileError::OutOfRange { .. })
    ));
}

async fn seed(dir: &Path, value: u64) {
    let backend = FileBackend::open(dir).unwrap();
    backend
        .raise_high_water(value, backend.epoch())
        .await
        .unwrap();
}

/// A way to damage a record file's bytes.
type Damage = fn(&mut Vec<u8>);

/// A directory that was used (its record written once) and lost its record is refused like a
/// damaged one: starting it from 0 could repeat timestamps under a clock behind earlier grants.
#[tokio::test]
async fn a_used_directory_with_its_record_deleted_is_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path(), 888_000).await;
    let record = dir.path().join("high-water");
    fs::remove_file(&record).unwrap();
    let err = FileBackend::open(dir.path())
        .err()
        .expect("a used directory without its record must not open");
    let msg = err.to_string();
    assert!(matches!(err, FileError::Damaged { .. }), "{msg}");
    assert!(msg.contains("missing"), "{msg}");
    assert!(!record.exists(), "nothing is recreated");
    assert!(
        matches!(file::init(dir.path(), 5), Err(FileError::Damaged { .. })),
        "init refuses it too"
    );
}

/// A directory from before the initialisation mark (a record, no mark) opens, and is marked.
#[test]
fn a_directory_with_a_record_and_no_mark_opens_and_is_marked() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    drop(FileBackend::open(dir.path()).unwrap());
    fs::remove_file(dir.path().join("INITIALIZED")).unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    assert_eq!(backend.epoch(), Epoch::new(2));
    assert!(dir.path().join("INITIALIZED").exists());
}

/// A data directory written by the binary of commit b179cd2 (`tests/fixtures/file-b179cd2`:
/// three timestamps and one more, the blocks `invoice` 0..10 and 10..15, `a` 0..1 and `b` 0..1,
/// lease 1 of `writer-a` with bound 1796621001181 ms and lease 2 released) opens and serves:
/// timestamps above the last one it answered, each key where it stopped, lease 1 renewable and
/// no lease id handed out again. Opening rewrites only the high-water record (its start
/// counter); the others stay byte for byte.
#[tokio::test]
async fn a_data_directory_of_an_earlier_version_opens_and_serves() {
    let _turn = crate::common::topic(module_path!());
    use std::sync::Arc;

    use tso_proto::v1::{AcquireLeaseRequest, GetSeqRequest, GetTsRequest, RenewLeaseRequest};

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/file-b179cd2");
    const LAST_TS: u64 = 470_973_337_096_945_664;
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(FIXTURE).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let backend = FileBackend::open(dir.path()).unwrap();
    assert_eq!(
        backend.epoch(),
        Epoch::new(2),
        "the fixture was opened once"
    );
    for name in ["sequences", "leases", "INITIALIZED", "SEQUENCES", "LEASES"] {
        assert_eq!(
            fs::read(dir.path().join(name)).unwrap(),
            fs::read(Path::new(FIXTURE).join(name)).unwrap(),
            "{name} is left as it was"
        );
    }
    let state = backend.load().await.unwrap();
    assert!(state.high_water_ms > LAST_TS >> 18);
    let mut server = common::TestServer::start(
        Arc::new(backend),
        tso_server::Config::default(),
        Arc::new(tso_server::clock::SystemClock),
    )
    .await;
    server.wait_serving().await;
    let mut client = server.client().await;
    let ts = client.get_ts(GetTsRequest { count: 1 }).await.unwrap();
    let ts = ts.into_inner();
    assert!((ts.physical_ms << 18 | ts.logical_start as u64) > LAST_TS);
    for (key, start) in [("invoice", 15), ("a", 1), ("b", 1), ("new", 0)] {
        let request = GetSeqRequest {
            key: key.into(),
            count: 1,
        };
        let reply = client.get_seq(request).await.unwrap().into_inner();
        assert_eq!(reply.start, start, "{key} continues where it stopped");
    }
    let renewed = client
        .renew_lease(RenewLeaseRequest { lease_id: 1 })
        .await
        .expect("lease 1 of the old directory is live")
        .into_inner();
    assert!(renewed.ts_upper_bound >= 1_796_621_001_181);
    let acquired = client
        .acquire_lease(AcquireLeaseRequest {
            holder: b"writer-c".to_vec(),
            holder_epoch: 0,
            ttl_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acquired.lease_id, 3, "ids 1 and 2 were handed out before");
    server.stop().await.unwrap();
}
