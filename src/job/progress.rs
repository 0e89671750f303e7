//! Progress of a job on stderr: a bar on a terminal, a plain line every few seconds in a
//! log (Slurm), nothing with --quiet.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::time::{Duration, Instant};

const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    /// Documents this run will write (the corpus minus those resumed), when countable.
    todo: Option<usize>,
    done: usize,
    failed: usize,
    tokens: usize,
    start: Instant,
    last_line: Instant,
    /// Documents done when the last plain line was printed.
    printed: usize,
}

/// Non-blank lines of the corpus: a cheap pass that makes an ETA possible. Read in chunks,
/// never a whole line at once (a line may be huge), reporting progress per chunk: on a big
/// corpus this pass runs while the other ranks wait for the first wave.
fn count_documents(path: &Path) -> Option<usize> {
    let file = std::fs::File::open(path).ok()?;
    let mut input = std::io::BufReader::with_capacity(1 << 20, file);
    let (mut n, mut in_text) = (0, false);
    loop {
        let chunk = input.fill_buf().ok()?;
        if chunk.is_empty() {
            return Some(n + in_text as usize);
        }
        for &b in chunk {
            if b == b'\n' {
                n += in_text as usize;
                in_text = false;
            } else if !b.is_ascii_whitespace() {
                in_text = true;
            }
        }
        let len = chunk.len();
        input.consume(len);
        crate::liveness::advanced();
    }
}

impl Progress {
    pub fn new(corpus: &Path, resumed: usize, quiet: bool) -> Progress {
        let todo = if quiet { None } else { count_documents(corpus).map(|n| n.saturating_sub(resumed)) };
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(todo.unwrap_or(0) as u64);
            let style = ProgressStyle::with_template("{bar:30} {pos}/{len} docs  {msg}  ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let plain = !quiet && bar.is_none();
        if resumed > 0 && !quiet {
            eprintln!("resuming: {resumed} documents already in the output are skipped");
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
            eprintln!("{}", self.line());
        }
    }

    fn line(&self) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = match self.todo {
            Some(t) if self.done > 0 => format!(", ETA {:.0} s", elapsed / self.done as f64 * t.saturating_sub(self.done) as f64),
            _ => String::new(),
        };
        let of = self.todo.map(|t| format!("/{t}")).unwrap_or_default();
        format!("scored {}{of} documents ({} failed), {:.0} tokens/s{eta}", self.done, self.failed, self.rate())
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.plain && self.printed != self.done {
            eprintln!("{}", self.line());
        }
    }
}
