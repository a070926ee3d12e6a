//! The frame codec under property tests: every message round-trips, and hostile input
//! (random bytes, truncated frames, oversized prefixes, length claims beyond the input)
//! returns an error or "need more", never a panic and never a large allocation.
//!
//! A counting global allocator records the largest single allocation made while decoding,
//! so "no large allocation" is measured, not assumed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use tether_common::identity::Epoch;
use tether_common::protocol::*;

struct Counting;

thread_local! {
    // Per thread, so allocations of tests running in parallel do not count; `const`
    // initialisation, so reading them never allocates inside the allocator.
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    if TRACKING.with(Cell::get) {
        LARGEST.with(|largest| largest.set(largest.get().max(size)));
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the largest allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    TRACKING.with(|tracking| tracking.set(true));
    let result = f();
    TRACKING.with(|tracking| tracking.set(false));
    (result, LARGEST.with(Cell::get))
}

/// The link's default bound, used as the decoder's limit for hostile input.
const MAX: usize = 16 * 1024 * 1024;
/// What decoding hostile input may allocate at once. serde caps a sequence's
/// preallocation at 1 MiB, whatever length it claims.
const ALLOWED: usize = 1024 * 1024 + 4096;

fn text() -> impl Strategy<Value = String> {
    ".{0,24}"
}
fn json() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::null()),
        any::<i64>().prop_map(|n| Json(n.to_string())),
        text().prop_map(|s| Json::from_value(&serde_json::Value::String(s))),
    ]
}
fn module() -> impl Strategy<Value = ModuleRef> {
    (text(), text(), any::<u32>(), proptest::option::of(text())).prop_map(
        |(system, name, index, id)| ModuleRef {
            system,
            name,
            index,
            id,
        },
    )
}
fn owner() -> impl Strategy<Value = ControlOwner> {
    prop_oneof![Just(ControlOwner::Edge), Just(ControlOwner::Master)]
}
fn entity() -> impl Strategy<Value = EntityKind> {
    prop_oneof![
        Just(EntityKind::Edge),
        Just(EntityKind::Repository),
        Just(EntityKind::Driver),
        Just(EntityKind::Module),
        Just(EntityKind::System),
        Just(EntityKind::User),
    ]
}
fn change() -> impl Strategy<Value = ModelChange> {
    (any::<u64>(), entity(), text(), proptest::option::of(json())).prop_map(
        |(version, kind, id, record)| ModelChange {
            version,
            kind,
            id,
            record,
        },
    )
}
fn file() -> impl Strategy<Value = FileEntry> {
    (text(), any::<[u8; 32]>(), any::<u64>()).prop_map(|(path, hash, size)| FileEntry {
        path,
        hash,
        size,
    })
}
fn code_audit() -> impl Strategy<Value = Option<CodeAudit>> {
    proptest::option::of(
        (
            text(),
            proptest::option::of(text()),
            text(),
            proptest::option::of((text(), text())),
            any::<bool>(),
        )
            .prop_map(|(repository, from, to, module, refused)| CodeAudit {
                repository,
                from,
                to,
                module,
                refused,
            }),
    )
}
fn audit() -> impl Strategy<Value = AuditRecord> {
    (
        any::<u64>(),
        text(),
        owner(),
        owner(),
        any::<u64>(),
        text(),
        code_audit(),
    )
        .prop_map(
            |(time_ms, edge, from, to, epoch, reason, code)| AuditRecord {
                time_ms,
                edge: edge.into(),
                from,
                to,
                epoch: Epoch(epoch),
                reason,
                code,
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (owner(), any::<u64>(), text()).prop_map(|(owner, epoch, reason)| {
            Request::ControlDecision {
                owner,
                epoch: Epoch(epoch),
                reason,
            }
        }),
        Just(Request::MasterReady),
        (
            module(),
            text(),
            json(),
            any::<Option<u64>>(),
            proptest::option::of(owner())
        )
            .prop_map(|(module, method, args, epoch, holder)| Request::Execute {
                module,
                method,
                args,
                epoch: epoch.map(Epoch),
                holder,
            }),
        module().prop_map(|module| Request::StatusRequest { module }),
        module().prop_map(|module| Request::DebugSubscribe { module }),
        module().prop_map(|module| Request::DebugUnsubscribe { module }),
        batch().prop_map(Request::ModelChanges),
        (
            text(),
            text(),
            prop_oneof![
                Just(RepositoryAction::Reset),
                Just(RepositoryAction::Pull),
                Just(RepositoryAction::CatchUp)
            ],
            proptest::collection::vec(file(), 0..4)
        )
            .prop_map(
                |(repository, commit, action, files)| Request::RepositoryUpdate {
                    repository,
                    commit,
                    action,
                    files
                }
            ),
        text().prop_map(|driver| Request::LiveReload { driver }),
        text().prop_map(|system| Request::ExpireSystemCache { system }),
        text().prop_map(|system| Request::StartSystem { system }),
        text().prop_map(|system| Request::StopSystem { system }),
        (any::<u64>(), any::<u64>()).prop_map(|(model_id, since_version)| Request::SyncRequest {
            model_id,
            since_version
        }),
        proptest::collection::vec(any::<[u8; 32]>(), 0..4)
            .prop_map(|hashes| Request::FetchBlobs { hashes }),
        proptest::collection::vec(audit(), 0..4).prop_map(|events| Request::AuditEvents { events }),
        (owner(), any::<u64>(), any::<bool>()).prop_map(|(owner, epoch, controlling)| {
            Request::ControlReport {
                owner,
                epoch: Epoch(epoch),
                controlling,
            }
        }),
        text().prop_map(|api_url| Request::Hello { api_url }),
        module().prop_map(|module| Request::StatusSubscribe { module }),
        module().prop_map(|module| Request::DebugRead { module }),
    ]
}

fn batch() -> impl Strategy<Value = ModelBatch> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        proptest::collection::vec(change(), 0..4),
    )
        .prop_map(
            |(model_id, from_version, to_version, snapshot, changes)| ModelBatch {
                model_id,
                from_version,
                to_version,
                snapshot,
                changes,
            },
        )
}

fn remote_error() -> impl Strategy<Value = RemoteError> {
    let code = prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::StaleEpoch),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Timeout),
        Just(ErrorCode::Forbidden),
        Just(ErrorCode::Unsupported),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::Internal),
        Just(ErrorCode::NotHere),
        Just(ErrorCode::Faulted),
        Just(ErrorCode::Busy),
        Just(ErrorCode::Script),
    ];
    (code, text()).prop_map(|(code, message)| RemoteError { code, message })
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Ack),
        any::<u64>().prop_map(|epoch| Response::ControlAck {
            epoch: Epoch(epoch)
        }),
        (json(), text()).prop_map(|(value, executed_by)| Response::Value { value, executed_by }),
        proptest::collection::vec((text(), json()), 0..4)
            .prop_map(|entries| Response::Status { entries }),
        batch().prop_map(Response::ModelChanges),
        proptest::collection::vec((any::<u64>(), text()), 0..4)
            .prop_map(|lines| Response::DebugLines { lines }),
        text().prop_map(|side| Response::DoneBy { side }),
    ]
}

fn stream_item() -> impl Strategy<Value = StreamItem> {
    prop_oneof![
        (any::<u64>(), text()).prop_map(|(time_ms, line)| StreamItem::Debug { time_ms, line }),
        (
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(hash, data)| StreamItem::Blob { hash, data }),
        proptest::collection::vec((text(), json()), 0..4)
            .prop_map(|entries| StreamItem::StatusMap { entries }),
        (text(), json()).prop_map(|(key, value)| StreamItem::StatusValue { key, value }),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u32>(),
            request(),
            proptest::option::of(text().prop_map(OnBehalf))
        )
            .prop_map(|(id, deadline_ms, body, on_behalf)| {
                Envelope::Request {
                    id,
                    deadline_ms,
                    body,
                    on_behalf,
                }
            }),
        (
            any::<u64>(),
            prop_oneof![response().prop_map(Ok), remote_error().prop_map(Err)]
        )
            .prop_map(|(id, result)| Envelope::Response { id, result }),
        (any::<u64>(), stream_item()).prop_map(|(id, item)| Envelope::StreamItem { id, item }),
        (
            any::<u64>(),
            prop_oneof![Just(Ok(())), remote_error().prop_map(Err)]
        )
            .prop_map(|(id, result)| Envelope::StreamEnd { id, result }),
        any::<u64>().prop_map(|id| Envelope::Cancel { id }),
        (text(), text(), json(), any::<u64>()).prop_map(|(module_id, key, value, epoch)| {
            Envelope::Notice(Notice::StatusChanged {
                module_id,
                key,
                value,
                epoch: Epoch(epoch),
            })
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_us)| Envelope::Ping { seq, sent_us }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_us)| Envelope::Pong { seq, sent_us }),
        text().prop_map(|reason| Envelope::Close { reason }),
    ]
}

fn handshake() -> impl Strategy<Value = Handshake> {
    prop_oneof![
        (any::<u16>(), any::<[u8; 32]>())
            .prop_map(|(protocol, nonce)| Handshake::Challenge { protocol, nonce }),
        (any::<u16>(), text(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
            |(protocol, edge_id, nonce, mac)| Handshake::Answer {
                protocol,
                edge_id,
                nonce,
                mac
            }
        ),
        any::<[u8; 32]>().prop_map(|mac| Handshake::Accepted { mac }),
        text().prop_map(|reason| Handshake::Refused { reason }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_envelope_round_trips(value in envelope()) {
        let frame = encode_frame(&value, MAX).unwrap();
        let (decoded, used) = decode_frame::<Envelope>(&frame, MAX).unwrap().unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(decoded, value);
    }

    #[test]
    fn every_handshake_message_round_trips(value in handshake()) {
        let frame = encode_frame(&value, HANDSHAKE_MAX_FRAME).unwrap();
        let (decoded, _) = decode_frame::<Handshake>(&frame, HANDSHAKE_MAX_FRAME).unwrap().unwrap();
        prop_assert_eq!(decoded, value);
    }

    #[test]
    fn every_prefix_of_a_frame_asks_for_more(value in envelope(), cut in any::<prop::sample::Index>()) {
        let frame = encode_frame(&value, MAX).unwrap();
        let cut = cut.index(frame.len());
        prop_assert!(decode_frame::<Envelope>(&frame[..cut], MAX).unwrap().is_none());
    }

    #[test]
    fn random_bytes_never_panic_nor_allocate_much(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        // As a frame body (the prefix is right, the content is noise) ...
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        let (_, largest) = largest_allocation(|| {
            let _ = decode_frame::<Envelope>(&framed, MAX);
            let _ = decode_frame::<Handshake>(&framed, HANDSHAKE_MAX_FRAME);
            // ... and as raw bytes, prefix included.
            let _ = decode_frame::<Envelope>(&body, MAX);
        });
        prop_assert!(largest <= ALLOWED, "allocated {largest} bytes at once");
    }

    #[test]
    fn oversized_prefixes_are_refused_at_once(claim in (HANDSHAKE_MAX_FRAME as u32 + 1)..=u32::MAX) {
        let mut input = claim.to_be_bytes().to_vec();
        input.extend_from_slice(&[0u8; 16]);
        let (result, largest) = largest_allocation(|| decode_frame::<Handshake>(&input, HANDSHAKE_MAX_FRAME));
        let is_too_large = matches!(result, Err(FrameError::TooLarge { .. }));
        prop_assert!(is_too_large);
        prop_assert!(largest <= 1024);
    }

    #[test]
    fn length_claims_beyond_the_input_are_refused(claim in 64u64..u64::MAX, tail in proptest::collection::vec(any::<u8>(), 0..32)) {
        // An Execute whose method name claims `claim` bytes but holds only `tail`.
        let mut body = vec![0u8, 1, 0]; // Request, id 1, deadline 0
        body.push(2); // Request::Execute
        body.extend_from_slice(&[0, 0, 1, 0]); // system "", name "", index 1, id None
        let mut varint = claim;
        loop {
            let byte = (varint & 0x7f) as u8;
            varint >>= 7;
            if varint == 0 { body.push(byte); break; }
            body.push(byte | 0x80);
        }
        body.extend_from_slice(&tail);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let (result, largest) = largest_allocation(|| decode_frame::<Envelope>(&frame, MAX));
        prop_assert!(result.is_err());
        prop_assert!(largest <= ALLOWED, "allocated {largest} bytes at once");
    }
}

#[test]
fn a_frame_that_claims_the_whole_bound_allocates_only_what_arrived() {
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;
    let mut codec = FrameCodec::<Envelope>::new(MAX);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&(MAX as u32).to_be_bytes());
    buf.extend_from_slice(&[1, 2, 3]);
    let (result, largest) = largest_allocation(|| codec.decode(&mut buf));
    assert!(result.unwrap().is_none(), "waits for the rest");
    assert!(largest < 4096, "reserved {largest} bytes for a claim");
}

#[test]
fn a_huge_sequence_claim_is_bounded_by_serde() {
    // FetchBlobs claiming 2^40 hashes with none present.
    let mut body = vec![0u8, 1, 0, 13];
    let mut varint: u64 = 1 << 40;
    loop {
        let byte = (varint & 0x7f) as u8;
        varint >>= 7;
        if varint == 0 {
            body.push(byte);
            break;
        }
        body.push(byte | 0x80);
    }
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let (result, largest) = largest_allocation(|| decode_frame::<Envelope>(&frame, MAX));
    assert!(result.is_err());
    assert!(largest <= ALLOWED, "allocated {largest}");
}

#[test]
fn the_hand_made_prefix_above_is_what_postcard_writes() {
    // Guards the hostile-input tests: their bytes must reach the field they aim at.
    let value = Envelope::Request {
        id: 1,
        deadline_ms: 0,
        body: Request::Execute {
            module: ModuleRef {
                system: String::new(),
                name: String::new(),
                index: 1,
                id: None,
            },
            method: "ab".into(),
            args: Json::null(),
            epoch: None,
            holder: None,
        },
        on_behalf: None,
    };
    let frame = encode_frame(&value, MAX).unwrap();
    assert_eq!(&frame[4..13], &[0, 1, 0, 2, 0, 0, 1, 0, 2]);
    let fetch = Envelope::Request {
        id: 1,
        deadline_ms: 0,
        body: Request::FetchBlobs {
            hashes: vec![[0; 32]],
        },
        on_behalf: None,
    };
    assert_eq!(&encode_frame(&fetch, MAX).unwrap()[4..9], &[0, 1, 0, 13, 1]);
}

#[test]
fn the_allocation_counter_sees_a_real_large_allocation() {
    // Guards the tests above: a counter that saw nothing would pass them all.
    let blob = Envelope::StreamItem {
        id: 1,
        item: StreamItem::Blob {
            hash: [0; 32],
            data: vec![7; 2 << 20],
        },
    };
    let frame = encode_frame(&blob, MAX).unwrap();
    let (decoded, largest) = largest_allocation(|| decode_frame::<Envelope>(&frame, MAX));
    assert!(decoded.unwrap().is_some());
    assert!(largest >= 2 << 20, "saw only {largest} bytes");
}
