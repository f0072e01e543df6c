//! Shared setup for the slacker benchmarks.

use slacker_core::{Backend, VolumeId, VolumeOptions};

/// Creates volume `name` of `size` bytes and writes `written` bytes of data spread over it
/// in 64 KiB pieces.
pub async fn volume_with_data<B: Backend>(b: &B, name: &str, size: u64, written: u64) -> VolumeId {
    let id = VolumeId::new(name).expect("valid id");
    b.create_volume(&id, &VolumeOptions::new(size))
        .await
        .expect("create");
    let piece = vec![0xA5u8; 64 * 1024];
    let pieces = written / piece.len() as u64;
    let stride = (size / pieces.max(1)) & !4095;
    for i in 0..pieces {
        b.write_at(&id, i * stride, &piece).await.expect("write");
    }
    id
}
