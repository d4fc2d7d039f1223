//! `multipart/form-data` upload bodies (CDI's `upload-form` paths): the part named `file` streamed out of the body
//! as it arrives, other parts skipped, in a fixed buffer whatever the body's size.
//!
//! Untrusted sizes are capped: the boundary at [`MAX_BOUNDARY`] bytes (RFC 2046's 70), one part's headers at
//! [`MAX_PART_HEAD`] bytes and [`MAX_PART_HEADERS`] fields.

use std::io::{self, Read};

/// Longest boundary accepted (RFC 2046).
pub const MAX_BOUNDARY: usize = 70;
/// Largest header block of one part.
pub const MAX_PART_HEAD: usize = 16 * 1024;
/// Most header fields in one part.
pub const MAX_PART_HEADERS: usize = 64;
/// Read buffer.
const BUFFER: usize = 64 * 1024;

/// The boundary of a `multipart/form-data` (or `multipart/mixed`) content type, as Go's `MultipartReader` accepts
/// them; an error message otherwise.
pub fn boundary(content_type: Option<&str>) -> Result<String, String> {
    let content_type = content_type.ok_or("request Content-Type isn't multipart/form-data")?;
    let mut parts = content_type.split(';');
    let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if media != "multipart/form-data" && media != "multipart/mixed" {
        return Err("request Content-Type isn't multipart/form-data".into());
    }
    let params = parameters(&content_type[content_type.find(';').unwrap_or(content_type.len())..]);
    let boundary = params
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v)
        .ok_or("no multipart boundary param in Content-Type")?;
    if boundary.is_empty() || boundary.len() > MAX_BOUNDARY || !boundary.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!("invalid multipart boundary (1 to {MAX_BOUNDARY} printable ASCII characters)"));
    }
    Ok(boundary)
}

/// `; key=value; key="quoted"` parameters (keys as sent).
fn parameters(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && (bytes[i] == b';' || bytes[i].is_ascii_whitespace()) {
            i += 1;
        }
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && bytes[i] != b';' {
            i += 1;
        }
        let key = text[key_start..i].trim().to_string();
        if i >= bytes.len() || bytes[i] == b';' {
            continue;
        }
        i += 1; // '='
        let mut value = String::new();
        if bytes.get(i) == Some(&b'"') {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                let c = text[i..].chars().next().unwrap_or('\u{fffd}');
                value.push(c);
                i += c.len_utf8();
            }
            i += 1;
        } else {
            let start = i;
            while i < bytes.len() && bytes[i] != b';' {
                i += 1;
            }
            value = text[start..i].trim().to_string();
        }
        if !key.is_empty() {
            out.push((key, value));
        }
    }
    out
}

/// The form field name of a part (Go's `Part.FormName`): the `name` parameter of a `form-data` disposition.
pub fn form_name(headers: &[(String, String)]) -> Option<String> {
    let disposition = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("content-disposition"))?.1.as_str();
    let kind = disposition.split(';').next()?.trim();
    if !kind.eq_ignore_ascii_case("form-data") {
        return None;
    }
    let rest = &disposition[disposition.find(';').unwrap_or(disposition.len())..];
    parameters(rest).into_iter().find(|(k, _)| k.eq_ignore_ascii_case("name")).map(|(_, v)| v)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter, or inside a part's data.
    Data,
    /// Just past a delimiter: a part's headers or the close marker follow.
    Delimiter,
    /// After the close delimiter.
    Closed,
}

/// A streaming `multipart` reader: [`next_part`](Self::next_part) moves to the next part, `Read` yields the
/// current part's data.
pub struct Multipart<R> {
    inner: R,
    /// `CRLF--boundary`.
    delimiter: Vec<u8>,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    inner_done: bool,
    state: State,
    in_part: bool,
}

impl<R: Read> Multipart<R> {
    /// Reads `inner` as a multipart body with `boundary`.
    pub fn new(inner: R, boundary: &str) -> Self {
        let mut buf = vec![0u8; BUFFER].into_boxed_slice();
        // A virtual CRLF before the body: the first delimiter then looks like every other one.
        buf[..2].copy_from_slice(b"\r\n");
        Multipart {
            inner,
            delimiter: [b"\r\n--", boundary.as_bytes()].concat(),
            buf,
            pos: 0,
            end: 2,
            inner_done: false,
            state: State::Data,
            in_part: false,
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        if self.inner_done {
            return Ok(0);
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            return Ok(0);
        }
        let n = loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            self.inner_done = true;
        }
        self.end += n;
        Ok(n)
    }

    /// Moves to the next part (skipping what is left of the current one) and returns its header fields; `None`
    /// after the last part.
    pub fn next_part(&mut self) -> io::Result<Option<Vec<(String, String)>>> {
        let mut sink = [0u8; 8192];
        while self.state == State::Data {
            self.read_data(&mut sink)?;
        }
        if self.state == State::Closed {
            return Ok(None);
        }
        // After the delimiter: "--" closes the body; otherwise optional padding, then CRLF and headers.
        while self.end - self.pos < 2 {
            if self.fill()? == 0 {
                return Err(bad("multipart body ends after a delimiter"));
            }
        }
        if &self.buf[self.pos..self.pos + 2] == b"--" {
            self.pos += 2;
            self.state = State::Closed;
            return Ok(None);
        }
        let mut headers = Vec::new();
        let mut head_bytes = 0usize;
        let mut first = true;
        loop {
            let line = self.read_line(MAX_PART_HEAD - head_bytes.min(MAX_PART_HEAD))?;
            head_bytes += line.len() + 2;
            if first {
                // The rest of the delimiter line: only transport padding may stand there.
                first = false;
                if !line.iter().all(|&b| b == b' ' || b == b'\t') {
                    return Err(bad("garbage after a multipart delimiter"));
                }
                continue;
            }
            if line.is_empty() {
                break;
            }
            if headers.len() == MAX_PART_HEADERS {
                return Err(bad(&format!("more than {MAX_PART_HEADERS} headers in a multipart part")));
            }
            let text = String::from_utf8_lossy(&line);
            let (name, value) = text.split_once(':').ok_or_else(|| bad("malformed multipart part header"))?;
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        self.state = State::Data;
        self.in_part = true;
        Ok(Some(headers))
    }

    fn read_line(&mut self, max: usize) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf[self.pos..self.end].windows(2).position(|w| w == b"\r\n") {
                if i > max {
                    break;
                }
                let line = self.buf[self.pos..self.pos + i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.end - self.pos > max {
                break;
            }
            if self.fill()? == 0 {
                return Err(bad("multipart body ends inside a part's headers"));
            }
        }
        Err(bad(&format!("multipart part headers longer than {MAX_PART_HEAD} bytes")))
    }

    /// Data up to the next delimiter; 0 once it is reached (the state then moves past it).
    fn read_data(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let window = &self.buf[self.pos..self.end];
            let found = find(window, &self.delimiter);
            let safe = match found {
                Some(i) => i,
                // Bytes that cannot start a delimiter yet to arrive.
                None => window.len().saturating_sub(self.delimiter.len() - 1),
            };
            if safe > 0 {
                let n = safe.min(out.len());
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if found.is_some() {
                self.pos += self.delimiter.len();
                self.state = State::Delimiter;
                self.in_part = false;
                return Ok(0);
            }
            if self.fill()? == 0 && self.inner_done {
                return Err(bad("multipart body ends before its closing delimiter"));
            }
        }
    }
}

impl<R: Read> Read for Multipart<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.in_part || self.state != State::Data || out.is_empty() {
            return Ok(0);
        }
        self.read_data(out)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut from = 0;
    while let Some(i) = haystack[from..].iter().position(|&b| b == first) {
        let at = from + i;
        if haystack.len() - at < needle.len() {
            return None;
        }
        if &haystack[at..at + needle.len()] == needle {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Reads `body` as a form and returns the reader positioned at the data of the part named `file` (Go's
/// `formReadCloser`: earlier parts are skipped; no such part is an error).
pub fn file_part<R: Read>(body: R, boundary: &str) -> io::Result<Multipart<R>> {
    let mut form = Multipart::new(body, boundary);
    loop {
        match form.next_part()? {
            None => return Err(bad("the form has no part named \"file\"")),
            Some(headers) => match form_name(&headers) {
                Some(name) if name == "file" => return Ok(form),
                name => log::info!("Ignoring part {}", name.unwrap_or_default()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader returning at most `step` bytes a call, to exercise every split of a delimiter.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.data.len().min(self.step).min(out.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn form(boundary: &str, file: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(b"preamble\r\n");
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n").as_bytes(),
        );
        body.extend_from_slice(
            format!(
                "--{boundary}  \r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.qcow2\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(file);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        body
    }

    #[test]
    fn streams_the_file_part_across_every_split() {
        let boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW";
        // File data full of near-delimiters.
        let mut file = Vec::new();
        for i in 0..2000u32 {
            file.extend_from_slice(b"\r\n--");
            file.extend_from_slice(&boundary.as_bytes()[..(i as usize % boundary.len())]);
            file.extend_from_slice(&i.to_le_bytes());
        }
        let body = form(boundary, &file);
        for step in [1, 2, 3, 7, 64, 4096, 1 << 20] {
            let mut part = file_part(Trickle { data: &body, step }, boundary).unwrap();
            let mut got = Vec::new();
            part.read_to_end(&mut got).unwrap();
            assert_eq!(got, file, "step {step}");
            assert!(part.next_part().unwrap().is_none());
        }
    }

    #[test]
    fn refuses_malformed_forms() {
        let b = "xyz";
        let no_file = format!("--{b}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--{b}--\r\n");
        assert!(file_part(no_file.as_bytes(), b).is_err());
        let full = form(b, b"some file data");
        let mut part = file_part(&full[..full.len() - 15], b).unwrap();
        assert!(io::copy(&mut part, &mut io::sink()).is_err());
        let huge_header = format!("--{b}\r\nX: {}\r\n\r\n", "a".repeat(MAX_PART_HEAD + 1));
        assert!(file_part(huge_header.as_bytes(), b).is_err());
        let many: String = (0..=MAX_PART_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(file_part(format!("--{b}\r\n{many}\r\n").as_bytes(), b).is_err());
        assert!(file_part(&b"no delimiter at all"[..], b).is_err());
    }

    #[test]
    fn mangled_forms_never_panic() {
        let b = "bnd";
        let valid = form(b, b"file bytes\r\n--bn not a delimiter");
        let mut state = 0x0bad_5eed_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5_000 {
            let mut body = valid.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % body.len() as u64) as usize;
                match next() % 3 {
                    0 => body[at] = next() as u8,
                    1 => {
                        body.remove(at);
                    }
                    _ => body.insert(at, b"\r\n-"[(next() % 3) as usize]),
                }
            }
            let step = (next() % 9 + 1) as usize;
            if let Ok(mut part) = file_part(Trickle { data: &body, step }, b) {
                let _ = io::copy(&mut part, &mut io::sink());
                let _ = part.next_part();
            }
            let _ = boundary(Some(&String::from_utf8_lossy(&body[..40.min(body.len())])));
            let _ = form_name(&[("Content-Disposition".into(), String::from_utf8_lossy(&body).into_owned())]);
        }
    }

    #[test]
    fn boundaries_and_names() {
        assert_eq!(boundary(Some("multipart/form-data; boundary=abc")).unwrap(), "abc");
        assert_eq!(boundary(Some("Multipart/Form-Data; charset=x; boundary=\"a b;c\"")).unwrap(), "a b;c");
        assert!(boundary(Some("application/octet-stream")).is_err());
        assert!(boundary(None).is_err());
        assert!(boundary(Some("multipart/form-data")).is_err());
        assert!(boundary(Some(&format!("multipart/form-data; boundary={}", "x".repeat(71)))).is_err());
        let headers =
            vec![("content-disposition".to_string(), "form-data; filename=\"a\\\"b\"; name=file".to_string())];
        assert_eq!(form_name(&headers).as_deref(), Some("file"));
        let attachment = vec![("Content-Disposition".to_string(), "attachment; name=\"file\"".to_string())];
        assert_eq!(form_name(&attachment), None);
    }
}
