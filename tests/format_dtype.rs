//! Output dtype conversion: f32 -> bf16 / f16 rounds to nearest, narrow -> f32 is exact.

mod format_common;

use falcon_batch::format::convert::convert_path;
use falcon_batch::format::model_dir::ModelDir;
use falcon_batch::model::Part;
use falcon_batch::tensor::DType;
use format_common::*;

fn part_values(md: &ModelDir, part: Part) -> Vec<(String, DType, Vec<f32>)> {
    md.read_part(part).unwrap().into_iter().map(|(n, t)| (n, t.dtype, t.to_f32())).collect()
}

#[test]
fn f32_to_bf16_and_f16_round_within_half_an_ulp() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("hf");
    let raw = llama_checkpoint(&src, 1, DType::F32, 1);
    let embed = raw["model.embed_tokens.weight"].to_f32();
    // Values are in [-1, 1): relative half-ulp is 2^-9 for bf16 and 2^-11 for f16.
    for (dtype, rel) in [(DType::Bf16, 1.0 / 256.0), (DType::F16, 1.0 / 1024.0)] {
        let out = tmp.path().join(dtype.name());
        let m = convert_path(&src, &out, Some(dtype)).unwrap();
        assert_eq!(m.dtype, dtype);
        let md = ModelDir::open(&out).unwrap();
        for part in Part::all(1) {
            for (name, d, _) in part_values(&md, part) {
                assert_eq!(d, dtype, "{part:?} {name}");
            }
        }
        let got = &part_values(&md, Part::Begin)[0].2;
        for (g, w) in got.iter().zip(&embed) {
            assert!((g - w).abs() <= rel * w.abs().max(1e-4), "{dtype:?}: {g} vs {w}");
        }
        assert_eq!(md.read_part(Part::Begin).unwrap()[0].1, raw["model.embed_tokens.weight"].to_dtype(dtype));
    }
}

#[test]
fn bf16_to_f32_and_back_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("hf");
    let raw = falcon_checkpoint(&src, 1, DType::Bf16, 2);
    let wide = tmp.path().join("wide");
    convert_path(&src, &wide, Some(DType::F32)).unwrap();
    let md = ModelDir::open(&wide).unwrap();
    let begin = md.read_part(Part::Begin).unwrap();
    assert_eq!(begin[0].1.dtype, DType::F32);
    assert_eq!(begin[0].1.to_f32(), raw["transformer.word_embeddings.weight"].to_f32());
    assert_eq!(begin[0].1.to_dtype(DType::Bf16), raw["transformer.word_embeddings.weight"]);

    // Back to bf16 gives the source bytes; with no --dtype the config's torch_dtype (float32)
    // wins over the tensors' dtype, so that is the widened directory again.
    let narrow = tmp.path().join("narrow");
    convert_path(&src, &narrow, Some(DType::Bf16)).unwrap();
    let a = ModelDir::open(&narrow).unwrap();
    assert_eq!(a.read_part(Part::Begin).unwrap()[0].1, raw["transformer.word_embeddings.weight"]);
    let native = tmp.path().join("native");
    let m = convert_path(&src, &native, None).unwrap();
    assert_eq!(m.dtype, DType::F32);
    assert_eq!(m.model_id, md.manifest().model_id);
}
