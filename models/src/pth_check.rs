//! What a PyTorch zip checkpoint may ask of candle's pickle reader, checked before the reader
//! sees it.
//!
//! `candle_core::pickle` trusts the file it reads: a string's length is allocated before its
//! bytes are read (a pickle of ten bytes can ask for 4 GiB), every `BINGET` and `BINPUT` copies
//! the memoised object in full (a pickle of a few hundred bytes can double an object forty
//! times over), objects nest as deep as the pickle says (and are dropped recursively), and a
//! tensor's buffer is allocated from its shape before its data is read. [`scan`] replays the
//! stack effects of every `data.pkl` in the archive with sizes instead of objects, exactly as
//! candle's reader would run them, and refuses a pickle that would make the reader hold more
//! than [`object_budget`] or nest deeper than [`MAX_DEPTH`]; it also returns the size of every
//! entry, so that a tensor is read only if its storage holds its data
//! ([`Archive::check_tensor`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// What the archive holds: the size of each entry, capped by the file's size (entries are
/// stored uncompressed: candle's zip reader has no decompressor).
#[derive(Debug, Clone, Default)]
pub(crate) struct Archive {
    entries: HashMap<String, u64>,
    file_len: u64,
}

impl Archive {
    /// Whether the tensor `name`, `dims` elements of `elem_bytes` bytes each, starting
    /// `offset` bytes into the entry `storage`, lies inside that entry; the error says why not.
    pub(crate) fn check_tensor(
        &self,
        name: &str,
        storage: &str,
        dims: &[usize],
        elem_bytes: usize,
        offset: usize,
    ) -> Result<(), String> {
        let need = dims
            .iter()
            .try_fold(elem_bytes as u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_add(offset as u64));
        let Some(&have) = self.entries.get(storage) else {
            return Err(format!(
                "tensor `{name}`: its storage {storage:?} is not in the archive"
            ));
        };
        let have = have.min(self.file_len);
        match need {
            Some(need) if need <= have => Ok(()),
            Some(need) => Err(format!(
                "tensor `{name}` of shape {dims:?} needs {need} bytes of its storage \
                 {storage:?}, which holds {have}"
            )),
            None => Err(format!(
                "tensor `{name}` of shape {dims:?} has more elements than can be addressed"
            )),
        }
    }
}

/// How deep objects may nest (a real checkpoint's pickle nests about ten levels deep).
pub(crate) const MAX_DEPTH: u32 = 256;

/// Bytes an object costs the reader besides its strings (an enum of two strings, or of two
/// boxes, plus the allocator's share).
const NODE_BYTES: u64 = 64;

/// The most bytes of objects (each copy counted) the reader may make from a pickle of
/// `pickle_len` bytes: 64 MiB, plus 64 bytes for each of the pickle's bytes. A real
/// checkpoint's pickle (20 kB for OPT-125m, a few hundred kB for billions of parameters)
/// makes a few times its own size.
pub(crate) fn object_budget(pickle_len: u64) -> u64 {
    (64u64 << 20).saturating_add(pickle_len.saturating_mul(64))
}

/// Opens the zip at `path`, lists its entries and checks each `data.pkl` (as candle finds
/// them: every entry whose name ends with `data.pkl`). The error says what is wrong.
pub(crate) fn scan(path: &Path) -> Result<Archive, String> {
    let file = crate::files::open_regular(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| format!("not a readable zip archive ({e})"))?;
    let mut archive = Archive {
        entries: HashMap::new(),
        file_len,
    };
    for i in 0..zip.len() {
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = entry
            .name()
            .map_err(|e| format!("zip entry {i}: {e}"))?
            .into_owned();
        archive.entries.insert(name, entry.size());
    }
    let pickles: Vec<String> = archive
        .entries
        .keys()
        .filter(|n| n.ends_with("data.pkl"))
        .cloned()
        .collect();
    for name in pickles {
        let entry = zip.by_name(&name).map_err(|e| format!("{name}: {e}"))?;
        let len = entry.size().min(file_len);
        let mut reader = BufReader::new(entry.take(len));
        Replay::new(len)
            .run(&mut reader)
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(archive)
}

/// What candle's reader would hold for an object: its kind (as far as the stack effects
/// depend on it), its bytes and how deep it nests.
#[derive(Debug, Clone, Copy)]
struct Obj {
    kind: Kind,
    bytes: u64,
    depth: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mark,
    Dict,
    List,
    /// `collections.OrderedDict` or `collections.defaultdict`: `REDUCE` makes an empty dict.
    DictClass,
    Other,
}

/// candle's stack machine (`candle_core::pickle::Stack`), replayed with [`Obj`]s.
struct Replay {
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
    /// Bytes of the pickle not read yet.
    left: u64,
    /// Bytes of objects made so far, each copy counted.
    made: u64,
    budget: u64,
}

impl Replay {
    fn new(len: u64) -> Self {
        Self {
            stack: Vec::new(),
            memo: HashMap::new(),
            left: len,
            made: 0,
            budget: object_budget(len),
        }
    }

    /// Runs the pickle to its `STOP`.
    fn run(&mut self, r: &mut impl BufRead) -> Result<(), String> {
        loop {
            let op = self.byte(r)?;
            if op == b'.' {
                return Ok(());
            }
            self.op(op, r)?;
        }
    }

    fn op(&mut self, op: u8, r: &mut impl BufRead) -> Result<(), String> {
        match op {
            // PROTO
            0x80 => self.skip(r, 1)?,
            // GLOBAL: module and name, each to the end of its line.
            b'c' => {
                let module = self.line(r)?;
                let class = self.line(r)?;
                let dict = module == b"collections"
                    && (class == b"OrderedDict" || class == b"defaultdict");
                let kind = if dict { Kind::DictClass } else { Kind::Other };
                let bytes = NODE_BYTES + module.len() as u64 + class.len() as u64;
                self.push(kind, bytes, 0)?;
            }
            // BINPUT, LONG_BINPUT: the memo keeps a copy of the top.
            b'q' | b'r' => {
                let id = if op == b'q' {
                    u32::from(self.byte(r)?)
                } else {
                    self.u32(r)?
                };
                let top = *self.stack.last().ok_or("BINPUT on an empty stack")?;
                self.spend(top.bytes)?;
                self.memo.insert(id, top);
            }
            // BINGET, LONG_BINGET: a copy of a memoised object.
            b'h' | b'j' => {
                let id = if op == b'h' {
                    u32::from(self.byte(r)?)
                } else {
                    self.u32(r)?
                };
                let obj = *self
                    .memo
                    .get(&id)
                    .ok_or_else(|| format!("BINGET of {id}, which is not in the memo"))?;
                self.spend(obj.bytes)?;
                self.stack.push(obj);
            }
            // EMPTY_TUPLE, NONE, NEWTRUE, NEWFALSE
            b')' | b'N' | 0x88 | 0x89 => self.push(Kind::Other, NODE_BYTES, 0)?,
            // EMPTY_LIST
            b']' => self.push(Kind::List, NODE_BYTES, 0)?,
            // EMPTY_DICT; candle reads DICT (`d`) as EMPTY_DICT too.
            b'}' | b'd' => self.push(Kind::Dict, NODE_BYTES, 0)?,
            // MARK
            b'(' => self.push(Kind::Mark, NODE_BYTES, 0)?,
            // BININT1, BININT2, BININT, BINFLOAT
            b'K' | b'M' | b'J' | b'G' => {
                let n = match op {
                    b'K' => 1,
                    b'M' => 2,
                    b'J' => 4,
                    _ => 8,
                };
                self.skip(r, n)?;
                self.push(Kind::Other, NODE_BYTES, 0)?;
            }
            // LONG1: candle shifts each byte into an i64.
            0x8a => {
                let n = self.byte(r)?;
                if n > 8 {
                    return Err(format!("an integer of {n} bytes (at most 8 are read)"));
                }
                self.skip(r, u64::from(n))?;
                self.push(Kind::Other, NODE_BYTES, 0)?;
            }
            // BINUNICODE: candle allocates the length before reading.
            b'X' => {
                let n = u64::from(self.u32(r)?);
                if n > self.left {
                    return Err(format!(
                        "a string of {n} bytes where {} bytes are left",
                        self.left
                    ));
                }
                self.skip(r, n)?;
                self.push(Kind::Other, NODE_BYTES + n, 0)?;
            }
            // BINPERSID
            b'Q' => {
                let id = self.pop()?;
                self.wrap(&[id])?;
            }
            // TUPLE
            b't' => {
                let items = self.pop_to_mark()?;
                self.wrap(&items)?;
            }
            // TUPLE1, TUPLE2, TUPLE3
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if self.stack.len() < n {
                    return Err("TUPLE of more objects than the stack holds".to_string());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.wrap(&items)?;
            }
            // NEWOBJ: always a reduce object.
            0x81 => {
                let args = self.pop()?;
                let class = self.pop()?;
                self.wrap(&[class, args])?;
            }
            // REDUCE: `OrderedDict()` and `defaultdict(...)` are empty dicts.
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                if callable.kind == Kind::DictClass {
                    self.push(Kind::Dict, NODE_BYTES, 0)?;
                } else {
                    self.wrap(&[callable, args])?;
                }
            }
            // BUILD: a dict built with a dict takes its items; anything else is wrapped.
            b'b' => {
                let args = self.pop()?;
                let obj = self.pop()?;
                if obj.kind == Kind::Dict && args.kind == Kind::Dict {
                    let merged = Obj {
                        kind: Kind::Dict,
                        bytes: obj.bytes.saturating_add(args.bytes),
                        depth: obj.depth.max(args.depth),
                    };
                    self.push_obj(merged, 0)?;
                } else {
                    self.wrap(&[obj, args])?;
                }
            }
            // APPEND, SETITEM: the values go into the list or dict below them.
            b'a' | b's' => {
                let n = if op == b'a' { 1 } else { 2 };
                if self.stack.len() < n {
                    return Err("APPEND or SETITEM on a short stack".to_string());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                let want = if op == b'a' { Kind::List } else { Kind::Dict };
                self.extend(want, &items)?;
            }
            // APPENDS, SETITEMS: the values since the mark.
            b'e' | b'u' => {
                let items = self.pop_to_mark()?;
                if op == b'u' && items.len() % 2 != 0 {
                    return Err("SETITEMS of an odd number of objects".to_string());
                }
                let want = if op == b'e' { Kind::List } else { Kind::Dict };
                self.extend(want, &items)?;
            }
            other => return Err(format!("unknown op-code {other}")),
        }
        Ok(())
    }

    fn spend(&mut self, bytes: u64) -> Result<(), String> {
        self.made = self.made.saturating_add(bytes);
        if self.made > self.budget {
            return Err(format!(
                "the pickle makes more than {} bytes of objects (copies of memoised objects \
                 counted)",
                self.budget
            ));
        }
        Ok(())
    }

    fn push(&mut self, kind: Kind, bytes: u64, depth: u32) -> Result<(), String> {
        self.push_obj(Obj { kind, bytes, depth }, bytes)
    }

    /// Pushes `obj`, whose making costs `cost` bytes (less than its size when it takes in
    /// objects from the stack, which move into it).
    fn push_obj(&mut self, obj: Obj, cost: u64) -> Result<(), String> {
        if obj.depth > MAX_DEPTH {
            return Err(format!("objects nest more than {MAX_DEPTH} levels deep"));
        }
        self.spend(cost)?;
        self.stack.push(obj);
        Ok(())
    }

    /// A new object holding `items` (a tuple, a reduce, a persistent id, ...).
    fn wrap(&mut self, items: &[Obj]) -> Result<(), String> {
        let bytes = items
            .iter()
            .fold(NODE_BYTES, |acc, o| acc.saturating_add(o.bytes));
        let depth = items.iter().map(|o| o.depth + 1).max().unwrap_or(0);
        let obj = Obj {
            kind: Kind::Other,
            bytes,
            depth,
        };
        self.push_obj(obj, NODE_BYTES)
    }

    /// `items` added to the list or dict on top of the stack.
    fn extend(&mut self, want: Kind, items: &[Obj]) -> Result<(), String> {
        let top = self
            .stack
            .last_mut()
            .ok_or("APPEND or SETITEM on an empty stack")?;
        if top.kind != want {
            return Err("APPEND or SETITEM on an object that is not a list or dict".to_string());
        }
        for o in items {
            top.bytes = top.bytes.saturating_add(o.bytes);
            top.depth = top.depth.max(o.depth + 1);
        }
        if top.depth > MAX_DEPTH {
            return Err(format!("objects nest more than {MAX_DEPTH} levels deep"));
        }
        Ok(())
    }

    fn pop(&mut self) -> Result<Obj, String> {
        self.stack
            .pop()
            .ok_or_else(|| "an op-code needs an object and the stack is empty".to_string())
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Obj>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|o| o.kind == Kind::Mark)
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn byte(&mut self, r: &mut impl BufRead) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.read_exact(r, &mut b)?;
        Ok(b[0])
    }

    fn u32(&mut self, r: &mut impl BufRead) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.read_exact(r, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_exact(&mut self, r: &mut impl BufRead, buf: &mut [u8]) -> Result<(), String> {
        r.read_exact(buf)
            .map_err(|_| "the pickle ends before its STOP".to_string())?;
        self.left = self.left.saturating_sub(buf.len() as u64);
        Ok(())
    }

    fn skip(&mut self, r: &mut impl BufRead, n: u64) -> Result<(), String> {
        let got = std::io::copy(&mut r.take(n), &mut std::io::sink())
            .map_err(|e| format!("cannot read the pickle ({e})"))?;
        if got < n {
            return Err("the pickle ends before its STOP".to_string());
        }
        self.left = self.left.saturating_sub(n);
        Ok(())
    }

    /// A line without its `\n` (and `\r`), as candle's `read_to_newline` reads it.
    fn line(&mut self, r: &mut impl BufRead) -> Result<Vec<u8>, String> {
        let mut line = Vec::new();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read the pickle ({e})"))?;
        self.left = self.left.saturating_sub(n as u64);
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(pickle: &[u8]) -> Result<(), String> {
        Replay::new(pickle.len() as u64).run(&mut std::io::Cursor::new(pickle))
    }

    #[test]
    fn a_state_dict_pickle_passes() {
        // {"w": _rebuild_tensor_v2(persistent ("storage", FloatStorage, "0", "cpu", 6), 0,
        //  (2, 3), (3, 1), False, OrderedDict())}, as torch.save writes it.
        let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00w".to_vec();
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)RtRu.");
        assert_eq!(replay(&p), Ok(()));
    }

    #[test]
    fn a_string_longer_than_the_pickle_is_refused() {
        let err = replay(b"\x80\x02X\xff\xff\xff\x7fabc.").expect_err("must fail");
        assert!(err.contains("string of 2147483647 bytes"), "{err}");
    }

    #[test]
    fn doubling_through_the_memo_is_refused() {
        // x = (); then forty times: x = (x, x), each copy of x a full clone in candle.
        let mut p = b"\x80\x02)q\x00".to_vec();
        for _ in 0..40 {
            p.extend(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        let err = replay(&p).expect_err("must fail");
        assert!(err.contains("bytes of objects"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, MAX_DEPTH as usize + 1));
        p.push(b'.');
        let err = replay(&p).expect_err("must fail");
        assert!(err.contains("levels deep"), "{err}");
    }

    #[test]
    fn tensors_must_fit_their_storage() {
        let a = Archive {
            entries: HashMap::from([("archive/data/0".to_string(), 24)]),
            file_len: 1000,
        };
        assert_eq!(a.check_tensor("w", "archive/data/0", &[2, 3], 4, 0), Ok(()));
        let err = a
            .check_tensor("w", "archive/data/0", &[2, 3], 4, 4)
            .expect_err("past the end");
        assert!(
            err.contains("needs 28 bytes") && err.contains("holds 24"),
            "{err}"
        );
        let err = a
            .check_tensor("w", "archive/data/0", &[1 << 40, 1 << 40], 4, 0)
            .expect_err("overflow");
        assert!(err.contains("more elements"), "{err}");
        assert!(a.check_tensor("w", "archive/data/9", &[1], 4, 0).is_err());
    }
}
