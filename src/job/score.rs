//! The score job: corpus -> micro-batches -> waves through a runner::BatchScorer -> HDF5
//! results, in input order, resumable, one failed document never stopping the others.

use super::fault::Faults;
use super::in_order::InOrder;
use super::output_lock::OutputLock;
use super::paths::claim_outputs;
use super::progress::Progress;
use super::waves::Waves;
use super::JobError;
use crate::corpus::{open_corpus, scan, Batcher, CorpusOptions, CorpusReader, DocForm, Limits, ReadyDoc, Template, DEFAULT_TEMPLATE};
use crate::format::model_dir::ModelDir;
use crate::results::{check_csv_target, export_csv, plan_resume, read_results, DocResult, ExtractMeta, ResultsWriter, ResumeOptions, ResumePlan, RunAbout, RunMeta};
use crate::runner::BatchScorer;
use crate::schedule::cost::WireDtype;
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
    /// Score again documents whose prompt or choices changed since they were scored
    /// (otherwise such a file is refused).
    pub rescore_changed: bool,
    /// Score again every failed document (otherwise only those whose line changed).
    pub retry_failed: bool,
    /// Hidden states between ranks; None: the default for the manifest's dtype, as launch picks.
    pub wire: Option<WireDtype>,
    /// The arithmetic the ranks compute in, recorded in the results file ("f32").
    pub compute: String,
    pub quiet: bool,
    /// Per-document limits (--max-line-bytes, --max-choices, --max-doc-tokens).
    pub limits: Limits,
    /// The scheduler's id of the batch job this runs in (SLURM_JOB_ID): a requeued job takes
    /// over the output lock its previous run left.
    pub batch_job: Option<String>,
    /// The restart tests' fault hooks (none by default).
    pub faults: Faults,
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
    /// What the results file keeps and what this run scores.
    pub plan: ResumePlan,
    /// This job's claim on the output, held until the run ends.
    pub lock: OutputLock,
    /// Where the documents' choices come from (score: their "choices").
    pub form: DocForm,
}

impl Prepared {
    /// Every corpus document is in the results file as this run would score it: the run
    /// finishes ([`finish_without_weights`]) without reading any weight.
    pub fn nothing_to_do(&self) -> bool {
        self.plan.nothing_to_do()
    }
}

/// Everything that needs no weights: the corpus, tokenizer and template, the output's
/// identity and the resume plan (one pass over the corpus, no tokenizing).
pub fn prepare(dir: &ModelDir, opts: &ScoreOptions) -> Result<Prepared, JobError> {
    prepare_as(dir, opts, None, DocForm::Choices)
}

/// [`prepare`] for a run whose documents take their choices as `form` says and whose file
/// carries `extract`'s identity (the extract job).
pub(super) fn prepare_as(dir: &ModelDir, opts: &ScoreOptions, extract: Option<ExtractMeta>, form: DocForm) -> Result<Prepared, JobError> {
    // Before the results file is opened or replaced: a running job's work is never touched.
    let lock = claim_outputs(&opts.out, opts.csv.as_deref(), opts.batch_job.clone())?;
    // An unreadable corpus is fatal before anything is loaded or any output is touched.
    open_corpus(&opts.docs)?;
    let tokenizer = dir.tokenizer()?;
    let template = match &opts.template {
        Some(path) => Template::from_file(path),
        None => Template::parse(DEFAULT_TEMPLATE, "the default template"),
    }
    ?;
    if let Some(csv) = &opts.csv {
        check_csv_target(csv).map_err(JobError::CsvTarget)?;
    }
    let mut copts = CorpusOptions::new(template.clone(), dir.config().context_limit());
    copts.delimiter = opts.delimiter.clone();
    copts.limits = opts.limits;
    copts.form = form.clone();
    let scanned = scan(&opts.docs, &copts)?;
    let manifest = dir.manifest();
    let corpus = opts.docs.display().to_string();
    let meta = RunMeta {
        model_id: manifest.model_id.clone(),
        norm: opts.norm,
        template: template.source().to_string(),
        delimiter: opts.delimiter.clone(),
        wire_dtype: opts.wire.unwrap_or(WireDtype::default_for(manifest.dtype.size())).name().to_string(),
        compute: opts.compute.clone(),
        about: RunAbout {
            model_name: dir.dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            model_dir: dir.dir().display().to_string(),
            model_source: manifest.source.clone(),
            corpus: corpus.clone(),
            corpus_hash: scanned.file_hash.clone(),
        },
        extract,
    };
    let resume = ResumeOptions { overwrite: opts.overwrite, rescore_changed: opts.rescore_changed, retry_failed: opts.retry_failed };
    let plan = plan_resume(&opts.out, &meta, &scanned, &corpus, resume)?;
    Ok(Prepared { tokenizer, template, meta, plan, lock, form })
}

/// A run with nothing to score: the records the plan drops are removed, the file's
/// descriptive attributes updated and the CSV written, all without a model.
pub fn finish_without_weights(opts: &ScoreOptions, prepared: Prepared) -> Result<ScoreSummary, JobError> {
    let start = Instant::now();
    let Prepared { meta, plan, lock, .. } = prepared;
    let (writer, _) = ResultsWriter::open_dropping(&opts.out, meta, opts.overwrite, &plan.drop)?;
    if let Some(note) = writer.repair_note() {
        crate::warn!("{}: {note}", opts.out.display());
    }
    writer.close()?;
    let summary = ScoreSummary { resumed: plan.skip.len(), ..Default::default() };
    let summary = finish(opts, summary, start);
    drop(lock);
    summary
}

/// After the writer closed: count the file's documents and write the CSV.
fn finish(opts: &ScoreOptions, mut summary: ScoreSummary, start: Instant) -> Result<ScoreSummary, JobError> {
    let all = read_results(&opts.out)?;
    summary.docs_in_file = all.len();
    summary.failed_in_file = all.iter().filter(|r| !r.is_ok()).count();
    if let Some(csv) = &opts.csv {
        export_csv(&opts.out, csv).map_err(|source| JobError::Csv { out: opts.out.display().to_string(), source })?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Runs the whole job on the writer rank. `scorer` runs the model (here or over MPI).
pub fn run<S: BatchScorer + ?Sized>(dir: &ModelDir, opts: &ScoreOptions, prepared: Prepared, scorer: &mut S) -> Result<ScoreSummary, JobError>
where
    JobError: From<S::Error>,
{
    let start = Instant::now();
    let Prepared { tokenizer, template, meta, plan, lock, form } = prepared;
    let Opened { mut writer, copts, mut progress, resumed } = open_run(dir, opts, meta, plan, template, form)?;
    let reader = CorpusReader::open(&opts.docs, &tokenizer, copts)?;
    let mut order = InOrder::default();
    let mut batcher = Batcher::new(opts.batch_tokens);
    let mut wave: Vec<Vec<ReadyDoc>> = vec![];
    let mut summary = ScoreSummary { resumed, ..Default::default() };

    let mut waves = Waves::new(scorer, opts.norm, opts.faults);
    let mut flush = |order: &mut InOrder, summary: &mut ScoreSummary, progress: &mut Progress| write_ready(order, &mut writer, summary, progress, &opts.faults);

    for item in reader {
        let doc = item?;
        crate::liveness::advanced();
        match doc.result {
            Err(msg) => order.push_done(DocResult::failed(&doc.id, &doc.input_hash, &msg)),
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
    end_run(opts, writer, progress, summary, start, lock)
}

/// A run's end, once its last documents are written: the file closed, the summary counted
/// from it, and only then the lock released.
pub(super) fn end_run(opts: &ScoreOptions, writer: ResultsWriter, mut progress: Progress, summary: ScoreSummary, start: Instant, lock: OutputLock) -> Result<ScoreSummary, JobError> {
    writer.close()?;
    progress.finish();
    let summary = finish(opts, summary, start);
    drop(lock);
    summary
}

/// A run's writer (records the plan drops removed), its corpus options and progress.
pub(super) struct Opened {
    pub writer: ResultsWriter,
    pub copts: CorpusOptions,
    pub progress: Progress,
    /// Documents skipped as already in the file.
    pub resumed: usize,
}

pub(super) fn open_run(dir: &ModelDir, opts: &ScoreOptions, meta: RunMeta, plan: ResumePlan, template: Template, form: DocForm) -> Result<Opened, JobError> {
    let (writer, _) = ResultsWriter::open_dropping(&opts.out, meta, opts.overwrite, &plan.drop)?;
    if let Some(note) = writer.repair_note() {
        crate::warn!("{}: {note}", opts.out.display());
    }
    if plan.changed + plan.retried > 0 && !opts.quiet {
        crate::info!(
            "{}: scoring again {} changed and {} failed documents (their old records removed)",
            opts.out.display(),
            plan.changed,
            plan.retried
        );
    }
    let resumed = plan.skip.len();
    let mut copts = CorpusOptions::new(template, dir.config().context_limit());
    copts.skip_ids = plan.skip;
    copts.delimiter = opts.delimiter.clone();
    copts.limits = opts.limits;
    copts.form = form;
    let progress = Progress::new(plan.to_score, resumed, opts.quiet);
    Ok(Opened { writer, copts, progress, resumed })
}

/// The documents at the front of `order` that are ready, appended to the file.
pub(super) fn write_ready(order: &mut InOrder, writer: &mut ResultsWriter, summary: &mut ScoreSummary, progress: &mut Progress, faults: &Faults) -> Result<(), JobError> {
    let out = order.take_ready();
    if !out.is_empty() {
        writer.append(&out)?;
        crate::liveness::advanced();
        summary.added += out.len();
        faults.crash_point(summary.added);
        progress.docs(out.len(), out.iter().filter(|r| !r.is_ok()).count());
    }
    Ok(())
}
