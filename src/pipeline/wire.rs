//! Hidden states as they travel between ranks: f32 as computed, or bf16 (round to nearest
//! even, half the bytes). Compute stays f32 on both sides; only the hop is narrowed.

use crate::schedule::cost::WireDtype;
use half::bf16;

/// (T, C) f32 -> the bytes of one hop.
pub(crate) fn encode(x: &[f32], wire: WireDtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() * wire.bytes());
    match wire {
        WireDtype::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        WireDtype::Bf16 => x.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes())),
    }
    out
}

/// The bytes of one hop -> (T, C) f32. `bytes` has exactly values * wire.bytes() bytes (the
/// receive was posted with that length).
pub(crate) fn decode(bytes: &[u8], wire: WireDtype) -> Vec<f32> {
    match wire {
        WireDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        WireDtype::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly() {
        let x = [0.0f32, -1.5, 3.0e-20, f32::MAX, 1.0 / 3.0];
        assert_eq!(decode(&encode(&x, WireDtype::F32), WireDtype::F32), x);
    }

    #[test]
    fn bf16_halves_the_bytes_within_its_rounding() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.0137).collect();
        let bytes = encode(&x, WireDtype::Bf16);
        assert_eq!(bytes.len(), 2 * x.len());
        for (a, b) in x.iter().zip(decode(&bytes, WireDtype::Bf16)) {
            // 8 significant bits (7 stored): round-to-nearest is off by at most 2^-8 relative.
            assert!((a - b).abs() <= a.abs() / 256.0, "{a} -> {b}");
        }
    }
}
