//! A rank's run without mpirun: jobs go through the library's one entry
//! (job::rank::run_on_this_rank) in this process, an MPI singleton of size 1, as the binary
//! runs them. MPI starts once per process, so this file is one test.

mod common;

use common::proc::OutputWithin;
use common::tiny;
use falcon_batch::backend::select::DeviceChoice;
use falcon_batch::corpus::Limits;
use falcon_batch::job::generate::{GenerateJob, GenerateOptions};
use falcon_batch::job::rank::{run_on_this_rank, RankSettings};
use falcon_batch::job::score::ScoreOptions;
use falcon_batch::job::corpus_rank::{job_launch, ScoreJob};
use falcon_batch::job::JobError;
use falcon_batch::pipeline::{Cluster, ClusterSettings};
use falcon_batch::results::read_results;
use falcon_batch::sample::SamplingOptions;
use falcon_batch::schedule::ScheduleOptions;
use falcon_batch::score::Norm;
use falcon_batch::settings::Settings;
use std::path::Path;
use std::time::Duration;

fn score_options(docs: &Path, out: &Path) -> ScoreOptions {
    ScoreOptions {
        docs: docs.to_path_buf(),
        out: out.to_path_buf(),
        csv: None,
        norm: Norm::Sum,
        template: None,
        delimiter: " ".into(),
        batch_tokens: 40,
        wave: 0,
        overwrite: false,
        rescore_changed: false,
        retry_failed: false,
        wire: None,
        compute: "f32".into(),
        quiet: true,
        limits: Limits::default(),
        batch_job: None,
        faults: Default::default(),
    }
}

fn generate_options(model: &Path, prompts: &Path, out: &Path) -> GenerateOptions {
    GenerateOptions {
        model: model.to_path_buf(),
        prompt: None,
        prompts: Some(prompts.to_path_buf()),
        out: Some(out.to_path_buf()),
        overwrite: false,
        max_new_tokens: 4,
        sampling: SamplingOptions { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 },
        seed: None,
        stop: vec![],
        ignore_eos: true,
        kv_cache: Default::default(),
    }
}

#[test]
fn score_and_generate_jobs_run_in_this_process_through_the_rank_entry() {
    let d = common::tmp::dir("fb-rank-entry");
    let model = tiny::model(&d);
    let docs = tiny::corpus(&d, "corpus.jsonl", 6);
    let settings = RankSettings { device: DeviceChoice::Cpu, ..RankSettings::new(&Settings::default()) };
    let cluster = Cluster::init(&ClusterSettings::default()).expect("an MPI singleton");
    assert_eq!((cluster.rank, cluster.size), (0, 1));

    // The score job, as `falcon-batch score --batch-tokens 40 --wave 1` runs it.
    let here = d.join("here.h5");
    let schedule = ScheduleOptions { wave: Some(1), batch_tokens: 40, ..Default::default() };
    let opts = score_options(&docs, &here);
    let launch = job_launch(model.clone(), &opts, serde_json::json!({"command": "score", "norm": "sum"}), schedule.clone(), None, false);
    let job = ScoreJob::new(opts, launch);
    let (code, _trace) = run_on_this_rank(&cluster, &settings, &job).expect("the score job");
    assert_eq!(code, 0);
    let mine = read_results(&here).expect("results written in this process");
    assert_eq!(mine.len(), 6);
    assert!(mine.iter().all(|r| r.is_ok()), "{mine:?}");

    // The binary's run of the same job gives the same scores.
    let binary = d.join("binary.h5");
    let o = tiny::bin()
        .arg("score")
        .arg("--model")
        .arg(&model)
        .arg("--docs")
        .arg(&docs)
        .arg("--out")
        .arg(&binary)
        .args(["--batch-tokens", "40", "--wave", "1", "--quiet", "--device", "cpu"])
        .output_within(Duration::from_secs(120))
        .expect("falcon-batch score");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs = read_results(&binary).expect("the binary's results");
    for (m, t) in mine.iter().zip(&theirs) {
        assert_eq!((&m.id, m.best), (&t.id, t.best));
        for (a, b) in m.choices.iter().zip(&t.choices) {
            assert!((a.logprob - b.logprob).abs() < 1e-6, "{}: {} here, {} from the binary", m.id, a.logprob, b.logprob);
        }
    }

    // A second job kind in the same cluster: generation, to a file.
    let prompts = d.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"id\": \"a\", \"prompt\": \"t5 t6 t7\"}\n{\"id\": \"b\", \"prompt\": \"t9\"}\n").expect("prompts");
    let gen_out = d.join("gen.jsonl");
    let gen = GenerateJob::new(generate_options(&model, &prompts, &gen_out), ScheduleOptions { wave: Some(1), ..Default::default() }, None, None, false);
    let (code, _) = run_on_this_rank(&cluster, &settings, &gen).expect("the generate job");
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&gen_out).expect("generations").lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.iter().map(|v| v["id"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["a", "b"]);
    assert!(lines.iter().all(|v| v["tokens"].as_array().is_some_and(|t| t.len() == 4)), "{lines:?}");

    // On a single rank an error comes back to the caller (no abort): here a usage error.
    let again = GenerateJob::new(generate_options(&model, &prompts, &gen_out), ScheduleOptions::default(), None, None, false);
    match run_on_this_rank(&cluster, &settings, &again) {
        Err(JobError::Usage { flag: "--out", msg }) => assert!(msg.contains("--overwrite"), "{msg}"),
        other => panic!("expected the --out usage error, got {:?}", other.map(|(code, _)| code)),
    }
}
