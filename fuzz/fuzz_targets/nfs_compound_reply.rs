//! The NFSv4 XDR decoder of COMPOUND replies (what a server, or anything on the path to
//! it, sends back): the first byte picks the request's operations from every kind the
//! client sends, the rest is the reply body. Never panics, typed errors only.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use slacker_nfs_client::ops::{
    ChannelAttrs, Fh, Op, OpenClaim, OpenHow, SetAttrs, StateId, decode_compound,
};

fn menu() -> Vec<Op> {
    let sid = StateId { seqid: 1, other: [7; 12] };
    let ch = ChannelAttrs {
        header_pad: 0,
        max_request: 1 << 20,
        max_response: 1 << 20,
        max_response_cached: 4096,
        max_ops: 16,
        max_requests: 16,
    };
    vec![
        Op::Sequence { session: [1; 16], seqid: 1, slot: 0, highest_slot: 0, cache_this: false },
        Op::ExchangeId { verifier: [2; 8], owner: Bytes::from_static(b"fuzz"), flags: 0 },
        Op::CreateSession { clientid: 1, sequence: 1, flags: 0, fore: ch, back: ch, cb_program: 0 },
        Op::DestroySession([1; 16]),
        Op::DestroyClientId(1),
        Op::ReclaimComplete,
        Op::PutRootFh,
        Op::PutFh(Fh(Bytes::from_static(b"fh"))),
        Op::Lookup("x".into()),
        Op::GetFh,
        Op::GetAttr(vec![0, 1]),
        Op::SaveFh,
        Op::RestoreFh,
        Op::Open {
            share_access: 3,
            clientid: 1,
            owner: Bytes::from_static(b"o"),
            how: OpenHow::Guarded(SetAttrs::default()),
            claim: OpenClaim::Null("f".into()),
        },
        Op::Close(sid),
        Op::DelegReturn(sid),
        Op::Read { stateid: sid, offset: 0, count: 4096 },
        Op::Write { stateid: sid, offset: 0, stable: 0, data: Bytes::from_static(b"d") },
        Op::Commit { offset: 0, count: 0 },
        Op::Mkdir { name: "d".into(), mode: 0o755 },
        Op::Remove("r".into()),
        Op::Link("l".into()),
        Op::Rename { old: "a".into(), new: "b".into() },
        Op::SetAttr { stateid: sid, attrs: SetAttrs::default() },
        Op::ReadDir { cookie: 0, verifier: [0; 8], dircount: 4096, maxcount: 8192, attrs: vec![0] },
        Op::Allocate { stateid: sid, offset: 0, length: 1 },
        Op::Deallocate { stateid: sid, offset: 0, length: 1 },
        Op::Copy { src: sid, dst: sid, src_offset: 0, dst_offset: 0, count: 1 },
        Op::Clone { src: sid, dst: sid, src_offset: 0, dst_offset: 0, count: 1 },
        Op::Seek { stateid: sid, offset: 0, what: 0 },
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let menu = menu();
    // One to three operations, as the client's COMPOUNDs chain them.
    let n = menu.len();
    let ops: Vec<Op> = [pick as usize % n, (pick as usize / 7) % n, (pick as usize / 49) % n]
        [..1 + (pick as usize % 3)]
        .iter()
        .map(|&i| menu[i].clone())
        .collect();
    let _ = decode_compound(Bytes::copy_from_slice(body), &ops);
});
