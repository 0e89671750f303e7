//! The score job: corpus -> micro-batches -> waves through a runner::BatchScorer -> HDF5
//! results, in input order, resumable, one failed document never stopping the others.

use super::fault::crash_point;
use super::in_order::InOrder;
use super::output_lock::OutputLock;
use super::paths::claim_outputs;
use super::progress::Progress;
use super::waves::Waves;
use super::JobError;
use crate::corpus::{open_corpus, Batcher, CorpusOptions, CorpusReader, Limits, ReadyDoc, Template, DEFAULT_TEMPLATE};
use crate::format::model_dir::ModelDir;
use crate::results::{export_csv, read_results, DocResult, ResultsWriter, RunMeta};
use crate::runner::BatchScorer;
use crate::score::Norm;
use crate::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct ScoreOptions {
    pub docs: PathBuf,
    pub out: PathBuf,
    pub csv: Option<PathBuf>,
    pub norm: Norm,
    pub template: Option<PathBuf>,
    /// Put between a prompt and a choice where neither side has whitespace (lm-eval's
    /// `target_delimiter`).
    pub delimiter: String,
    /// Most rows (tokens) in one micro-batch.
    pub batch_tokens: usize,
    /// Micro-batches per wave.
    pub wave: usize,
    pub overwrite: bool,
    pub quiet: bool,
    /// Per-document limits (--max-line-bytes, --max-choices, --max-doc-tokens).
    pub limits: Limits,
    /// The scheduler's id of the batch job this runs in (SLURM_JOB_ID): a requeued job takes
    /// over the output lock its previous run left.
    pub batch_job: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreSummary {
    /// Documents in the results file after this run.
    pub docs_in_file: usize,
    /// Of those, documents with status "error".
    pub failed_in_file: usize,
    /// Documents this run added.
    pub added: usize,
    /// Documents found already scored and skipped.
    pub resumed: usize,
    /// Rows (tokens) this run sent through the model.
    pub tokens: usize,
    pub seconds: f64,
    /// SIGTERM stopped the run after the micro-batch in flight; documents not yet in the
    /// file are scored when the same command runs again.
    pub stopped: bool,
}

/// What one run needs before any document is read: fatal problems surface here.
pub struct Prepared {
    pub tokenizer: Tokenizer,
    pub template: Template,
    pub meta: RunMeta,
    /// This job's claim on the output, held until the run ends.
    pub lock: OutputLock,
}

pub fn prepare(dir: &ModelDir, opts: &ScoreOptions) -> Result<Prepared, JobError> {
    // Before the results file is opened or replaced: a running job's work is never touched.
    let lock = claim_outputs(&opts.out, opts.csv.as_deref(), opts.batch_job.clone())?;
    // An unreadable corpus is fatal before anything is loaded or any output is touched.
    open_corpus(&opts.docs).map_err(|e| JobError::Input(e.to_string()))?;
    let tokenizer = dir.tokenizer()?;
    let template = match &opts.template {
        Some(path) => Template::from_file(path),
        None => Template::parse(DEFAULT_TEMPLATE, "the default template"),
    }
    .map_err(|e| JobError::Input(e.to_string()))?;
    let meta = RunMeta {
        model_id: dir.manifest().model_id.clone(),
        norm: opts.norm,
        template: template.source().to_string(),
        delimiter: opts.delimiter.clone(),
    };
    Ok(Prepared { tokenizer, template, meta, lock })
}

/// Runs the whole job on the writer rank. `scorer` runs the model (here or over MPI).
pub fn run<S: BatchScorer + ?Sized>(dir: &ModelDir, opts: &ScoreOptions, prepared: Prepared, scorer: &mut S) -> Result<ScoreSummary, JobError>
where
    JobError: From<S::Error>,
{
    let start = Instant::now();
    let Prepared { tokenizer, template, meta, lock } = prepared;
    let (mut writer, done) = ResultsWriter::open(&opts.out, meta, opts.overwrite).map_err(|e| JobError::Output(e.to_string()))?;
    if let Some(note) = writer.repair_note() {
        eprintln!("{note}");
    }
    let resumed = done.len();
    let mut copts = CorpusOptions::new(template, dir.config().context_limit());
    copts.skip_ids = done;
    copts.delimiter = opts.delimiter.clone();
    copts.limits = opts.limits;
    let reader = CorpusReader::open(&opts.docs, &tokenizer, copts).map_err(|e| JobError::Input(e.to_string()))?;
    let mut progress = Progress::new(&opts.docs, resumed, opts.quiet);

    let mut order = InOrder::default();
    let mut batcher = Batcher::new(opts.batch_tokens);
    let mut wave: Vec<Vec<ReadyDoc>> = vec![];
    let mut summary = ScoreSummary { resumed, ..Default::default() };

    let mut waves = Waves::new(scorer, opts.norm);
    let mut flush = |order: &mut InOrder, summary: &mut ScoreSummary, progress: &mut Progress| -> Result<(), JobError> {
        let out = order.take_ready();
        if !out.is_empty() {
            writer.append(&out).map_err(|e| JobError::Output(e.to_string()))?;
            crate::liveness::advanced();
            summary.added += out.len();
            crash_point(summary.added);
            progress.docs(out.len(), out.iter().filter(|r| !r.is_ok()).count());
        }
        Ok(())
    };

    for item in reader {
        let doc = item.map_err(|e| JobError::Input(e.to_string()))?;
        crate::liveness::advanced();
        match doc.result {
            Err(msg) => order.push_done(DocResult::failed(&doc.id, &msg)),
            Ok(ready) => {
                order.push_scoring(ready.doc.index as u64);
                for piece in waves.pieces(ready, opts.batch_tokens) {
                    wave.extend(batcher.push(piece));
                }
            }
        }
        // Reading, tokenising and writing happen between these calls, while the waves in
        // flight keep the other ranks busy.
        waves.submit_ready(&mut wave, opts.wave, false, &mut order, &mut progress)?;
        flush(&mut order, &mut summary, &mut progress)?;
        if super::stop::requested() {
            summary.stopped = true;
            break;
        }
    }
    if !summary.stopped {
        if let Some(batch) = batcher.finish() {
            wave.push(batch);
        }
        waves.submit_ready(&mut wave, opts.wave, true, &mut order, &mut progress)?;
    }
    // Waves already on the ring finish either way: a stop writes their documents too.
    while waves.collect(&mut order, &mut progress)? {
        flush(&mut order, &mut summary, &mut progress)?;
    }
    flush(&mut order, &mut summary, &mut progress)?;
    summary.tokens = waves.tokens;
    writer.close().map_err(|e| JobError::Output(e.to_string()))?;
    progress.finish();

    let all = read_results(&opts.out).map_err(|e| JobError::Output(e.to_string()))?;
    summary.docs_in_file = all.len();
    summary.failed_in_file = all.iter().filter(|r| !r.is_ok()).count();
    if let Some(csv) = &opts.csv {
        export_csv(&opts.out, csv).map_err(|e| {
            let out = opts.out.display();
            JobError::Output(format!("{e}; {out} holds every document: run the same command again to write the CSV"))
        })?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    drop(lock);
    Ok(summary)
}
