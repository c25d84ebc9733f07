//! Files inside a TNEF attachment (`winmail.dat`, `application/ms-tnef`), which Outlook
//! sends instead of ordinary attachments: pure, no IO.
//!
//! Written by hand on purpose: the one TNEF crate (tnef 0.1) is unmaintained, rejects a
//! whole file on any attribute it does not know (real files carry many), requires
//! attributes that are optional, and ignores the long file name. This reader follows
//! MS-OXTNEF for the few attributes that make an attachment, skips everything else, and
//! never trusts a length: a damaged file yields the attachments read so far.

/// One file carried inside a TNEF stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TnefFile {
    /// The long file name when present, else the 8.3 title; may be empty.
    pub name: String,
    /// The MIME type Outlook recorded, when present.
    pub mime_type: Option<String>,
    /// The file's bytes.
    pub data: Vec<u8>,
}

const SIGNATURE: u32 = 0x223E_9F78;
const LEVEL_ATTACHMENT: u8 = 0x02;
const ATT_ATTACH_REND_DATA: u32 = 0x0006_9002;
const ATT_ATTACH_TITLE: u32 = 0x0001_8010;
const ATT_ATTACH_DATA: u32 = 0x0006_800F;
const ATT_ATTACHMENT: u32 = 0x0006_9005;
const PR_ATTACH_LONG_FILENAME: u16 = 0x3707;
const PR_ATTACH_MIME_TAG: u16 = 0x370E;

/// Little-endian reader that fails instead of reading past the end.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-prefixed value padded to 4 bytes (MAPI variable-size values).
    fn padded(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        let value = self.take(len)?;
        self.take((4 - len % 4) % 4)?;
        Some(value)
    }
}

/// True when `data` starts like a TNEF stream.
pub fn is_tnef(data: &[u8]) -> bool {
    data.len() >= 6 && u32::from_le_bytes([data[0], data[1], data[2], data[3]]) == SIGNATURE
}

/// The files in a TNEF stream (attachments without data are left out).
pub fn files(data: &[u8]) -> Vec<TnefFile> {
    if !is_tnef(data) {
        return Vec::new();
    }
    let mut cursor = Cursor { data: &data[6..] };
    let mut files = Vec::new();
    let mut current: Option<TnefFile> = None;
    while let Some(level) = cursor.u8() {
        let Some(id) = cursor.u32() else { break };
        let Some(len) = cursor.u32() else { break };
        let Some(value) = cursor.take(len as usize) else {
            break;
        };
        let Some(_checksum) = cursor.u16() else { break };
        if level != LEVEL_ATTACHMENT {
            continue;
        }
        match id {
            ATT_ATTACH_REND_DATA => {
                files.extend(current.take());
                current = Some(TnefFile {
                    name: String::new(),
                    mime_type: None,
                    data: Vec::new(),
                });
            }
            ATT_ATTACH_TITLE => {
                if let Some(file) = current.as_mut()
                    && file.name.is_empty()
                {
                    file.name = string8(value);
                }
            }
            ATT_ATTACH_DATA => {
                if let Some(file) = current.as_mut() {
                    file.data = value.to_vec();
                }
            }
            ATT_ATTACHMENT => {
                if let Some(file) = current.as_mut() {
                    let (long_name, mime_type) = attachment_properties(value);
                    if let Some(name) = long_name.filter(|n| !n.is_empty()) {
                        file.name = name;
                    }
                    file.mime_type = mime_type.filter(|m| m.contains('/'));
                }
            }
            _ => {}
        }
    }
    files.extend(current);
    files.retain(|f| !f.data.is_empty());
    files
}

/// An 8-bit string up to its NUL. The code page is rarely anything but Windows-1252.
fn string8(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    let bytes = &value[..end];
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

fn utf16(value: &[u8]) -> String {
    let units: Vec<u16> = value
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// PR_ATTACH_LONG_FILENAME and PR_ATTACH_MIME_TAG from an attAttachment MAPI property
/// list; stops quietly at anything it cannot read.
fn attachment_properties(value: &[u8]) -> (Option<String>, Option<String>) {
    let mut cursor = Cursor { data: value };
    let (mut long_name, mut mime_type) = (None, None);
    let Some(count) = cursor.u32() else {
        return (None, None);
    };
    for _ in 0..count {
        let (Some(prop_type), Some(prop_id)) = (cursor.u16(), cursor.u16()) else {
            break;
        };
        if prop_id >= 0x8000 {
            // Named property: GUID, kind, then an id or a name.
            if cursor.take(16).is_none() {
                break;
            }
            match cursor.u32() {
                Some(0) => {
                    if cursor.u32().is_none() {
                        break;
                    }
                }
                Some(1) => {
                    if cursor.padded().is_none() {
                        break;
                    }
                }
                _ => break,
            }
        }
        let multi = prop_type & 0x1000 != 0;
        let base = prop_type & 0x0FFF;
        let values = if multi { cursor.u32() } else { Some(1) };
        let Some(values) = values else { break };
        let mut last: Option<&[u8]> = None;
        for _ in 0..values {
            let value = match base {
                // PT_STRING8, PT_UNICODE, PT_BINARY, PT_OBJECT: a count of values, each padded.
                0x001E | 0x001F | 0x0102 | 0x000D => {
                    let inner = if multi { Some(1) } else { cursor.u32() };
                    let Some(inner) = inner else {
                        return (long_name, mime_type);
                    };
                    let mut v = None;
                    for _ in 0..inner {
                        v = cursor.padded();
                        if v.is_none() {
                            return (long_name, mime_type);
                        }
                    }
                    v
                }
                0x0002 | 0x000B | 0x0003 | 0x0004 | 0x000A | 0x0001 => cursor.take(4),
                0x0005 | 0x0006 | 0x0007 | 0x0014 | 0x0040 => cursor.take(8),
                0x0048 => cursor.take(16),
                _ => return (long_name, mime_type),
            };
            let Some(value) = value else {
                return (long_name, mime_type);
            };
            last = Some(value);
        }
        let text = |v: &[u8]| if base == 0x001F { utf16(v) } else { string8(v) };
        match (prop_id, last) {
            (PR_ATTACH_LONG_FILENAME, Some(v)) if base == 0x001E || base == 0x001F => {
                long_name = Some(text(v))
            }
            (PR_ATTACH_MIME_TAG, Some(v)) if base == 0x001E || base == 0x001F => {
                mime_type = Some(text(v))
            }
            _ => {}
        }
    }
    (long_name, mime_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(level: u8, id: u32, data: &[u8]) -> Vec<u8> {
        let mut out = vec![level];
        out.extend(id.to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend(data);
        let sum = data.iter().fold(0u16, |s, &b| s.wrapping_add(u16::from(b)));
        out.extend(sum.to_le_bytes());
        out
    }

    #[test]
    fn unknown_attributes_are_skipped_and_a_cut_stream_keeps_what_was_read() {
        let mut t = SIGNATURE.to_le_bytes().to_vec();
        t.extend([0, 0]);
        t.extend(attr(1, 0x0007_8008, b"IPM.Note\0"));
        t.extend(attr(2, ATT_ATTACH_REND_DATA, &[0; 14]));
        t.extend(attr(2, 0x0009_9999, b"an attribute nobody knows"));
        t.extend(attr(2, ATT_ATTACH_TITLE, b"A.TXT\0"));
        t.extend(attr(2, ATT_ATTACH_DATA, b"first"));
        t.extend(attr(2, ATT_ATTACHMENT, &[0xFF; 3])); // a broken property list
        t.extend(attr(2, ATT_ATTACH_REND_DATA, &[0; 14]));
        t.extend(attr(2, ATT_ATTACH_TITLE, b"B.TXT\0"));
        let whole = files(&t);
        assert_eq!(whole.len(), 1, "B has no data");
        assert_eq!(
            (whole[0].name.as_str(), whole[0].data.as_slice()),
            ("A.TXT", &b"first"[..])
        );
        for cut in 0..t.len() {
            let _ = files(&t[..cut]); // never panics
        }
    }

    #[test]
    fn not_tnef_or_truncated_gives_nothing() {
        assert!(files(b"hello").is_empty());
        assert!(files(&[0x78, 0x9F, 0x3E, 0x22, 0, 0, 2, 2, 0x90]).is_empty());
    }
}
