//! The score job: corpus -> micro-batches -> waves through a BatchScorer -> HDF5 results,
//! in input order, resumable, one failed document never stopping the others.

use super::progress::Progress;
use super::{BatchScorer, JobError};
use crate::corpus::{build_batch, open_corpus, Batcher, CorpusOptions, CorpusReader, ReadyDoc, Template, DEFAULT_TEMPLATE};
use crate::format::model_dir::ModelDir;
use crate::layout::MicroBatch;
use crate::results::{export_csv, read_results, DocResult, ResultsWriter, RunMeta};
use crate::score::{score_document, Norm};
use crate::tokenizer::Tokenizer;
use std::collections::{HashMap, VecDeque};
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
}

pub fn prepare(dir: &ModelDir, opts: &ScoreOptions) -> Result<Prepared, JobError> {
    // An unreadable corpus is fatal before anything is loaded or any output is touched.
    open_corpus(&opts.docs).map_err(|e| JobError::Input(e.to_string()))?;
    let tokenizer = Tokenizer::from_file(&dir.tokenizer_path()).map_err(|e| JobError::Input(e.to_string()))?;
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
    Ok(Prepared { tokenizer, template, meta })
}

/// Fault injection for the restart tests: with FALCON_BATCH_KILL_AFTER_DOCS=N the process
/// SIGKILLs itself once N documents are written, exactly as an OOM killer or scancel would;
/// FALCON_BATCH_TERM_AFTER_DOCS=N sends itself SIGTERM instead, as Slurm preemption does.
fn crash_point(written: usize) {
    let after = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<usize>().ok()).is_some_and(|n| written >= n);
    for (var, signal) in [("FALCON_BATCH_KILL_AFTER_DOCS", libc::SIGKILL), ("FALCON_BATCH_TERM_AFTER_DOCS", libc::SIGTERM)] {
        if after(var) {
            // SAFETY: raise only sends a signal to this process.
            unsafe {
                libc::raise(signal);
            }
        }
    }
}

/// A document waiting for its turn to be written (results go out in input order).
enum Slot {
    Done(DocResult),
    Scoring(u64),
}

/// Per-choice token log-probs of every document of a batch, from its scored rows.
fn doc_scores(batch: &MicroBatch, docs: &[ReadyDoc], logprobs: &[f64], norm: Norm) -> Vec<DocResult> {
    let mut per_doc: Vec<Vec<Vec<f64>>> = docs.iter().map(|d| vec![vec![]; d.doc.choices.len()]).collect();
    for (s, lp) in batch.scored.iter().zip(logprobs) {
        per_doc[s.doc as usize][s.choice as usize].push(*lp);
    }
    docs.iter()
        .zip(per_doc)
        .map(|(d, lps)| {
            let scores = score_document(&lps, &d.choice_chars, norm);
            DocResult::scored(d, &scores).unwrap_or_else(|e| DocResult::failed(&d.doc.id, &e.to_string()))
        })
        .collect()
}

/// Waves submitted to the scorer and not yet collected, with their documents, oldest first.
struct Waves<'s> {
    scorer: &'s mut dyn BatchScorer,
    depth: usize,
    in_flight: VecDeque<(Vec<Vec<ReadyDoc>>, Vec<MicroBatch>)>,
    norm: Norm,
}

impl Waves<'_> {
    /// Submit a wave of micro-batches (documents per micro-batch), first collecting the oldest
    /// when `depth` waves are already in flight.
    fn submit(&mut self, wave: Vec<Vec<ReadyDoc>>, finished: &mut HashMap<u64, DocResult>, summary: &mut ScoreSummary, progress: &mut Progress) -> Result<(), JobError> {
        if self.in_flight.len() >= self.depth {
            self.collect(finished, summary, progress)?;
        }
        let batches: Vec<MicroBatch> = wave.iter().map(|docs| build_batch(docs.iter())).collect();
        self.scorer.submit(&batches)?;
        self.in_flight.push_back((wave, batches));
        Ok(())
    }

    /// Collect the oldest wave into `finished`; false when none was in flight.
    fn collect(&mut self, finished: &mut HashMap<u64, DocResult>, summary: &mut ScoreSummary, progress: &mut Progress) -> Result<bool, JobError> {
        let Some((wave, batches)) = self.in_flight.pop_front() else { return Ok(false) };
        let logprobs = self.scorer.collect()?;
        for ((docs, batch), lps) in wave.iter().zip(&batches).zip(&logprobs) {
            summary.tokens += batch.rows();
            progress.tokens(batch.rows());
            for (d, r) in docs.iter().zip(doc_scores(batch, docs, lps, self.norm)) {
                finished.insert(d.doc.index as u64, r);
            }
        }
        Ok(true)
    }
}

/// Runs the whole job on the writer rank. `scorer` runs the model (here or over MPI).
pub fn run(dir: &ModelDir, opts: &ScoreOptions, prepared: Prepared, scorer: &mut dyn BatchScorer) -> Result<ScoreSummary, JobError> {
    let start = Instant::now();
    let Prepared { tokenizer, template, meta } = prepared;
    let (mut writer, done) = ResultsWriter::open(&opts.out, meta, opts.overwrite).map_err(|e| JobError::Output(e.to_string()))?;
    if let Some(note) = writer.repair_note() {
        eprintln!("{note}");
    }
    let resumed = done.len();
    let mut copts = CorpusOptions::new(template, dir.config().context_limit());
    copts.skip_ids = done;
    copts.delimiter = opts.delimiter.clone();
    let reader = CorpusReader::open(&opts.docs, &tokenizer, copts).map_err(|e| JobError::Input(e.to_string()))?;
    let mut progress = Progress::new(&opts.docs, resumed, opts.quiet);

    let mut queue: VecDeque<Slot> = VecDeque::new();
    let mut finished: HashMap<u64, DocResult> = HashMap::new();
    let mut batcher = Batcher::new(opts.batch_tokens);
    let mut wave: Vec<Vec<ReadyDoc>> = vec![];
    let mut summary = ScoreSummary { resumed, ..Default::default() };

    let mut waves = Waves { depth: scorer.depth().max(1), scorer, in_flight: VecDeque::new(), norm: opts.norm };
    let mut flush = |queue: &mut VecDeque<Slot>, finished: &mut HashMap<u64, DocResult>, summary: &mut ScoreSummary, progress: &mut Progress| -> Result<(), JobError> {
        let mut out = vec![];
        while let Some(slot) = queue.front() {
            let ready = match slot {
                Slot::Done(_) => true,
                Slot::Scoring(k) => finished.contains_key(k),
            };
            if !ready {
                break;
            }
            match queue.pop_front() {
                Some(Slot::Done(r)) => out.push(r),
                Some(Slot::Scoring(k)) => out.extend(finished.remove(&k)),
                None => break,
            }
        }
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
            Err(msg) => queue.push_back(Slot::Done(DocResult::failed(&doc.id, &msg))),
            Ok(ready) => {
                queue.push_back(Slot::Scoring(ready.doc.index as u64));
                if let Some(batch) = batcher.push(ready) {
                    wave.push(batch);
                }
            }
        }
        if wave.len() >= opts.wave.max(1) {
            // Reading, tokenising and writing happen between these calls, while the waves in
            // flight keep the other ranks busy.
            waves.submit(std::mem::take(&mut wave), &mut finished, &mut summary, &mut progress)?;
        }
        flush(&mut queue, &mut finished, &mut summary, &mut progress)?;
        if super::stop::requested() {
            summary.stopped = true;
            break;
        }
    }
    if !summary.stopped {
        if let Some(batch) = batcher.finish() {
            wave.push(batch);
        }
        if !wave.is_empty() {
            waves.submit(wave, &mut finished, &mut summary, &mut progress)?;
        }
    }
    // Waves already on the ring finish either way: a stop writes their documents too.
    while waves.collect(&mut finished, &mut summary, &mut progress)? {
        flush(&mut queue, &mut finished, &mut summary, &mut progress)?;
    }
    flush(&mut queue, &mut finished, &mut summary, &mut progress)?;
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
    Ok(summary)
}
