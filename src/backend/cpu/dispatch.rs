//! Run-time choice among three copies of one `#[inline(always)]` slice loop: compiled for
//! AVX-512, for AVX2+FMA and for the baseline target (x86-64's SSE2, no FMA), the widest the
//! CPU runs called. The build targets the baseline, so without this every elementwise loop
//! of the backend (vmath.rs, round.rs, the bf16 epilogues) would run 4 lanes wide.

/// Each slice function: the AVX-512 copy, else the AVX2+FMA one, where the CPU has them, the
/// baseline one otherwise.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident, $fast:ident, $wide:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        dispatch!(@copies $(#[$doc])* $name, $fast, $wide, $body, $body, $body, ($($arg: $ty),*) -> $ret);
    };
    // A body generic over FUSED (see vmath.rs `madd`): fused in the copies whose target has FMA.
    (fused $(#[$doc:meta])* $name:ident, $fast:ident, $wide:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        dispatch!(@copies $(#[$doc])* $name, $fast, $wide, $body::<true>, $body::<true>, $body::<false>, ($($arg: $ty),*) -> $ret);
    };
    (@copies $(#[$doc:meta])* $name:ident, $fast:ident, $wide:ident, $fast_body:path, $wide_body:path, $base_body:path, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $fast($($arg: $ty),*) -> $ret {
            $fast_body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn $wide($($arg: $ty),*) -> $ret {
            $wide_body($($arg),*)
        }

        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the copy was compiled for.
                    return unsafe { $wide($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { $fast($($arg),*) };
                }
            }
            $base_body($($arg),*)
        }
    };
}

pub(super) use dispatch;
