//! Progress of a job on stderr: a bar on a terminal, a plain line every few seconds in a
//! log (Slurm), nothing with --quiet.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    /// Documents this run will write: the resume plan's count, from the corpus scan that
    /// the prepare step makes anyway.
    todo: usize,
    done: usize,
    failed: usize,
    tokens: usize,
    start: Instant,
    last_line: Instant,
    /// Documents done when the last plain line was printed.
    printed: usize,
}

impl Progress {
    pub fn new(todo: usize, resumed: usize, quiet: bool) -> Progress {
        let quiet = quiet || crate::report::is_quiet();
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(todo as u64);
            let style = ProgressStyle::with_template("{bar:30} {pos}/{len} docs  {msg}  ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let plain = !quiet && bar.is_none();
        if resumed > 0 && !quiet {
            crate::info!("resuming: {resumed} documents already in the output are skipped");
        }
        Progress { bar, plain, todo, done: 0, failed: 0, tokens: 0, start: Instant::now(), last_line: Instant::now(), printed: usize::MAX }
    }

    fn rate(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn tokens(&mut self, n: usize) {
        self.tokens += n;
    }

    pub fn docs(&mut self, n: usize, failed: usize) {
        self.done += n;
        self.failed += failed;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done as u64);
            bar.set_message(format!("{:.0} tokens/s, {} failed", self.rate(), self.failed));
        } else if self.plain && self.last_line.elapsed() >= PLAIN_EVERY {
            self.last_line = Instant::now();
            self.printed = self.done;
            crate::info!("{}", self.line());
        }
    }

    fn line(&self) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = match self.done {
            0 => String::new(),
            done => format!(", ETA {:.0} s", elapsed / done as f64 * self.todo.saturating_sub(done) as f64),
        };
        format!("scored {}/{} documents ({} failed), {:.0} tokens/s{eta}", self.done, self.todo, self.failed, self.rate())
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.plain && self.printed != self.done {
            crate::info!("{}", self.line());
        }
    }
}
