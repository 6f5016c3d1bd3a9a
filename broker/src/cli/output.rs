//! Rendering for the client subcommands: aligned tables, durations and
//! times, payloads, jobs, and the JSON shapes `--json` prints.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use gantry_worker::prost_types;
use gantry_worker::proto;
use serde::Serialize;

/// A plain text table: a header row, columns separated by two spaces,
/// numeric columns aligned right.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns whose header starts with `>` are aligned right (the `>` is dropped).
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.trim_start_matches('>').to_owned()).collect(),
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = width.saturating_sub(cell.chars().count());
                if self.right[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A short human duration: `850µs`, `12.3ms`, `4.2s`, `3m05s`, `2h07m`, `3d04h`.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d < Duration::from_millis(1) {
        format!("{}µs", d.as_micros())
    } else if d < Duration::from_secs(1) {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    } else if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else if secs < 86400 {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    } else {
        format!("{}d{:02}h", secs / 86400, (secs % 86400) / 3600)
    }
}

pub fn proto_duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(*d).ok())
}

pub fn fmt_proto_duration(d: Option<&prost_types::Duration>) -> String {
    proto_duration(d).map(fmt_duration).unwrap_or_else(|| "-".to_owned())
}

pub fn duration_ms(d: Option<&prost_types::Duration>) -> Option<u64> {
    proto_duration(d).map(|d| d.as_millis().min(u64::MAX as u128) as u64)
}

pub fn proto_time(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `2025-01-02T03:04:05.678Z (3.2s ago)`, or `-` when unset.
pub fn fmt_time(t: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    match proto_time(t) {
        None => "-".to_owned(),
        Some(t) => match now.duration_since(t) {
            Ok(ago) => format!("{} ({} ago)", rfc3339(t), fmt_duration(ago)),
            Err(e) => format!("{} (in {})", rfc3339(t), fmt_duration(e.duration())),
        },
    }
}

pub fn time_json(t: Option<&prost_types::Timestamp>) -> Option<String> {
    proto_time(t).map(rfc3339)
}

/// A state's name without the enum prefix: `SUCCEEDED`; unknown values as numbers.
pub fn state_name(state: i32) -> String {
    match proto::JobState::try_from(state) {
        Ok(s) => s.as_str_name().trim_start_matches("JOB_STATE_").to_owned(),
        Err(_) => format!("UNKNOWN({state})"),
    }
}

pub fn outcome_name(outcome: i32) -> String {
    match proto::AttemptOutcome::try_from(outcome) {
        Ok(o) => o.as_str_name().trim_start_matches("ATTEMPT_OUTCOME_").to_owned(),
        Err(_) => format!("UNKNOWN({outcome})"),
    }
}

/// The text of `bytes` when it is UTF-8 with no control characters other
/// than newlines and tabs.
pub fn printable(bytes: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(bytes).ok()?;
    s.chars().all(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r')).then_some(s)
}

/// A payload or result for humans: its text when printable, else its size.
pub fn fmt_bytes(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(empty)".to_owned();
    }
    match printable(bytes) {
        Some(s) => s.to_owned(),
        None => format!("<{} bytes, binary>", bytes.len()),
    }
}

/// Standard base64 with padding (RFC 4648), for binary data in JSON.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Bytes in JSON: the text when printable (else null), always the base64 and the size.
#[derive(Debug, Serialize)]
pub struct BytesJson {
    pub text: Option<String>,
    pub base64: String,
    pub len: usize,
}

impl BytesJson {
    pub fn new(bytes: &[u8]) -> BytesJson {
        BytesJson { text: printable(bytes).map(str::to_owned), base64: base64(bytes), len: bytes.len() }
    }
}

#[derive(Debug, Serialize)]
pub struct AttemptJson {
    pub attempt: u32,
    pub worker_id: String,
    pub session_id: String,
    pub fencing_token: u64,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub outcome: String,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct JobJson {
    pub id: String,
    pub queue: String,
    pub state: String,
    pub priority: i32,
    pub attempt: u32,
    pub max_attempts: u32,
    pub payload: BytesJson,
    pub headers: BTreeMap<String, String>,
    pub result: BytesJson,
    pub error: String,
    pub progress: String,
    pub created_at: Option<String>,
    pub run_at: Option<String>,
    pub finished_at: Option<String>,
    pub lease_deadline: Option<String>,
    pub lease_timeout_ms: Option<u64>,
    pub fencing_token: u64,
    pub worker_id: String,
    pub session_id: String,
    pub idempotency_key: String,
    pub history: Vec<AttemptJson>,
}

impl JobJson {
    pub fn new(job: &proto::Job) -> JobJson {
        JobJson {
            id: job.id.clone(),
            queue: job.queue.clone(),
            state: state_name(job.state),
            priority: job.priority,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            payload: BytesJson::new(&job.payload),
            headers: job.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            result: BytesJson::new(&job.result),
            error: job.error.clone(),
            progress: job.progress.clone(),
            created_at: time_json(job.created_at.as_ref()),
            run_at: time_json(job.run_at.as_ref()),
            finished_at: time_json(job.finished_at.as_ref()),
            lease_deadline: time_json(job.lease_deadline.as_ref()),
            lease_timeout_ms: duration_ms(job.lease_timeout.as_ref()),
            fencing_token: job.fencing_token,
            worker_id: job.worker_id.clone(),
            session_id: job.session_id.clone(),
            idempotency_key: job.idempotency_key.clone(),
            history: job
                .history
                .iter()
                .map(|a| AttemptJson {
                    attempt: a.attempt,
                    worker_id: a.worker_id.clone(),
                    session_id: a.session_id.clone(),
                    fencing_token: a.fencing_token,
                    started_at: time_json(a.started_at.as_ref()),
                    finished_at: time_json(a.finished_at.as_ref()),
                    outcome: outcome_name(a.outcome),
                    error: a.error.clone(),
                })
                .collect(),
        }
    }
}

/// Label/value lines with the values aligned.
#[derive(Debug, Default)]
pub struct Fields {
    lines: Vec<(String, String)>,
    min_width: usize,
}

impl Fields {
    /// Values start at least `min_width` + 2 columns in, whatever labels are present.
    pub fn with_min_width(min_width: usize) -> Fields {
        Fields { lines: Vec::new(), min_width }
    }

    pub fn add(&mut self, label: &str, value: impl Into<String>) {
        self.lines.push((label.to_owned(), value.into()));
    }

    pub fn render(&self) -> String {
        let width = self.lines.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0).max(self.min_width) + 1;
        let indent = " ".repeat(width + 1);
        let mut out = String::new();
        for (label, value) in &self.lines {
            let label = format!("{label}:");
            // Multi-line values (text payloads) continue under the first line.
            let value = value.trim_end_matches('\n').replace('\n', &format!("\n{indent}"));
            out.push_str(format!("{label:<width$} {value}").trim_end());
            out.push('\n');
        }
        out
    }
}

/// A job for humans: its fields, then its attempt history as a table.
pub fn render_job(job: &proto::Job, now: SystemTime) -> String {
    let mut f = Fields::with_min_width("idempotency key".len());
    f.add("id", &job.id);
    f.add("queue", &job.queue);
    f.add("state", state_name(job.state));
    f.add("attempt", format!("{}/{}", job.attempt, job.max_attempts));
    f.add("priority", job.priority.to_string());
    f.add("created", fmt_time(job.created_at.as_ref(), now));
    f.add("run at", fmt_time(job.run_at.as_ref(), now));
    f.add("finished", fmt_time(job.finished_at.as_ref(), now));
    if job.lease_deadline.is_some() {
        f.add("lease deadline", fmt_time(job.lease_deadline.as_ref(), now));
    }
    f.add("lease timeout", fmt_proto_duration(job.lease_timeout.as_ref()));
    let worker = match (job.worker_id.as_str(), job.session_id.as_str()) {
        ("", _) => "-".to_owned(),
        (w, "") => w.to_owned(),
        (w, s) => format!("{w} (session {s})"),
    };
    f.add("worker", worker);
    f.add("fencing token", job.fencing_token.to_string());
    if !job.idempotency_key.is_empty() {
        f.add("idempotency key", &job.idempotency_key);
    }
    if !job.headers.is_empty() {
        let mut headers: Vec<_> = job.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        headers.sort();
        f.add("headers", headers.join(", "));
    }
    if !job.progress.is_empty() {
        f.add("progress", &job.progress);
    }
    if !job.error.is_empty() {
        f.add("error", &job.error);
    }
    f.add("payload", fmt_bytes(&job.payload));
    f.add("result", fmt_bytes(&job.result));
    let mut out = f.render();
    if !job.history.is_empty() {
        let mut t = Table::new(&[">ATTEMPT", "WORKER", ">TOKEN", "STARTED", "DURATION", "OUTCOME", "ERROR"]);
        for a in &job.history {
            let started = proto_time(a.started_at.as_ref());
            let finished = proto_time(a.finished_at.as_ref());
            let took = match (started, finished) {
                (Some(s), Some(e)) => e.duration_since(s).map(fmt_duration).unwrap_or_else(|_| "-".to_owned()),
                (Some(s), None) => now.duration_since(s).map(|d| format!("{}+", fmt_duration(d))).unwrap_or_default(),
                _ => "-".to_owned(),
            };
            t.row(vec![
                a.attempt.to_string(),
                if a.worker_id.is_empty() { "-".to_owned() } else { a.worker_id.clone() },
                a.fencing_token.to_string(),
                started.map(rfc3339).unwrap_or_else(|| "-".to_owned()),
                took,
                outcome_name(a.outcome),
                a.error.replace('\n', " "),
            ]);
        }
        out.push_str("\nhistory:\n");
        out.push_str(&t.render());
    }
    out
}

pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(&["NAME", ">COUNT", "NOTE"]);
        t.row(vec!["a".into(), "1".into(), "".into()]);
        t.row(vec!["long-name".into(), "12345".into(), "x".into()]);
        assert_eq!(t.render(), "NAME       COUNT  NOTE\na              1\nlong-name  12345  x\n");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(fmt_duration(Duration::from_micros(850)), "850µs");
        assert_eq!(fmt_duration(Duration::from_micros(12_340)), "12.3ms");
        assert_eq!(fmt_duration(Duration::from_millis(4_240)), "4.2s");
        assert_eq!(fmt_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(fmt_duration(Duration::from_secs(2 * 3600 + 7 * 60)), "2h07m");
        assert_eq!(fmt_duration(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d04h");
        assert_eq!(fmt_proto_duration(None), "-");
        assert_eq!(fmt_proto_duration(Some(&prost_types::Duration { seconds: -1, nanos: 0 })), "-");
    }

    #[test]
    fn times_are_relative() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let ts = prost_types::Timestamp::from(t);
        assert_eq!(fmt_time(Some(&ts), t + Duration::from_secs(3)), "2023-11-14T22:13:20.000Z (3.0s ago)");
        assert_eq!(fmt_time(Some(&ts), t - Duration::from_secs(60)), "2023-11-14T22:13:20.000Z (in 1m00s)");
        assert_eq!(fmt_time(None, t), "-");
    }

    #[test]
    fn state_names_drop_the_prefix() {
        assert_eq!(state_name(proto::JobState::Succeeded as i32), "SUCCEEDED");
        assert_eq!(state_name(99), "UNKNOWN(99)");
        assert_eq!(outcome_name(proto::AttemptOutcome::LeaseTimedOut as i32), "LEASE_TIMED_OUT");
    }

    #[test]
    fn bytes_render_as_text_or_size() {
        assert_eq!(fmt_bytes(b""), "(empty)");
        assert_eq!(fmt_bytes(b"hello\nworld"), "hello\nworld");
        assert_eq!(fmt_bytes(&[0, 159, 146, 150]), "<4 bytes, binary>");
        assert_eq!(fmt_bytes(b"bell\x07"), "<5 bytes, binary>");
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn fields_indent_multiline_values() {
        let mut f = Fields::default();
        f.add("id", "j1");
        f.add("payload", "line1\nline2\n");
        assert_eq!(f.render(), "id:      j1\npayload: line1\n         line2\n");
    }

    #[test]
    fn jobs_render_with_history() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_100);
        let at = |s| Some(prost_types::Timestamp { seconds: s, nanos: 0 });
        let job = proto::Job {
            id: "0-42".into(),
            queue: "emails".into(),
            state: proto::JobState::Succeeded as i32,
            attempt: 1,
            max_attempts: 25,
            payload: b"hi".to_vec(),
            result: vec![0xff; 10],
            worker_id: "w1".into(),
            created_at: at(1_700_000_000),
            history: vec![proto::AttemptRecord {
                attempt: 1,
                worker_id: "w1".into(),
                fencing_token: 7,
                started_at: at(1_700_000_001),
                finished_at: at(1_700_000_003),
                outcome: proto::AttemptOutcome::Succeeded as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render_job(&job, now);
        assert!(text.contains("state:           SUCCEEDED\n"), "{text}");
        assert!(text.contains("attempt:         1/25\n"), "{text}");
        assert!(text.contains("result:          <10 bytes, binary>\n"), "{text}");
        assert!(text.contains("payload:         hi\n"), "{text}");
        assert!(text.contains("history:\nATTEMPT  WORKER  TOKEN  STARTED"), "{text}");
        assert!(text.contains("2.0s      SUCCEEDED"), "{text}");
        let json = serde_json::to_value(JobJson::new(&job)).expect("json");
        assert_eq!(json["state"], "SUCCEEDED");
        assert_eq!(json["payload"]["text"], "hi");
        assert_eq!(json["result"]["len"], 10);
        assert_eq!(json["history"][0]["outcome"], "SUCCEEDED");
    }
}
