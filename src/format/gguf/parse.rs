//! The GGUF container (llama.cpp): header, metadata key/values, tensor infos, data section.
//!
//! Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count,
//! metadata [(string key, u32 type, value)], tensor infos [(string name, u32 n_dims,
//! u64 dims[n_dims] innermost first, u32 ggml type, u64 offset)], padding to the alignment,
//! then the data section; tensor offsets are relative to its start.
//!
//! The file is untrusted: every length is checked against the bytes that remain before
//! anything is allocated, so a corrupt count cannot ask for gigabytes or panic.

use super::dequant::GgmlType;
use crate::format::{FormatError, Result};
use std::collections::HashMap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// llama.cpp's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal, but no real file nests deeply; the cap bounds recursion.
const MAX_NESTING: usize = 8;
/// No real model has anywhere near this many tensors or keys; larger counts mean corruption.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;

/// A metadata value of any GGUF type.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type that fits a u64 (files disagree on which width they write).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            // Through the shortest decimal form: an f32 1e-5 becomes the f64 1e-5 that the
            // original config.json said, not 9.999999747378752e-6.
            Value::F32(v) => format!("{v}").parse().ok(),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// Where one tensor's bytes are and how to read them.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (outermost first): the file's innermost-first dims reversed.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// A parsed GGUF header; tensor bytes stay in the caller's buffer (the mmap).
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: usize,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: String) -> FormatError {
        FormatError::Malformed { path: self.path.to_string(), msg }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {what} needs {n} bytes at offset {}, file has {} bytes",
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must be satisfiable: each item takes at least `min_item` bytes.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_item.max(1)) as u64;
        if n > fits {
            return Err(self.err(format!(
                "{what} is {n} but only {} bytes remain after offset {} (at least {min_item} per item)",
                self.remaining(),
                self.pos
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(&format!("length of {what}"), 1)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(format!("{what} at offset {start} is not valid UTF-8")))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(u8::from_le_bytes(self.array(key)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("metadata `{key}`: bool byte must be 0 or 1, found {b}"))),
            },
            8 => Value::Str(self.string(&format!("metadata `{key}` string"))?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(self.err(format!("metadata `{key}`: arrays nested deeper than {MAX_NESTING}")));
                }
                let elem = self.u32(key)?;
                let min = min_value_size(elem).ok_or_else(|| self.err(format!("metadata `{key}`: unknown array element type {elem}")))?;
                let n = self.count(&format!("metadata `{key}` array length"), min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.err(format!("metadata `{key}`: unknown value type {other}"))),
        })
    }
}

/// The fewest bytes a value of this type can occupy, for checking counts up front.
fn min_value_size(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12, // element type + length
        _ => return None,
    })
}

/// Parse the header of a GGUF file held in `buf`; `path` is only for messages.
pub fn parse(buf: &[u8], path: &str) -> Result<GgufHeader> {
    let mut r = Reader { buf, pos: 0, path };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err(r.err(format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\"")));
    }
    let version = r.u32("version")?;
    if version != 2 && version != 3 {
        let msg = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            "big-endian GGUF files are not supported".to_string()
        } else {
            format!("GGUF version {version} is not supported (expected 2 or 3)")
        };
        return Err(FormatError::Unsupported { path: path.into(), msg });
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
        return Err(r.err(format!("implausible counts: {n_tensors} tensors, {n_kv} metadata entries")));
    }

    let mut metadata = HashMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let type_id = r.u32(&format!("type of metadata `{key}`"))?;
        let value = r.value(type_id, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.err(format!("metadata key `{key}` appears twice")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => return Err(r.err(format!("general.alignment must be a power of two, found {v:?}"))),
        },
    };

    let mut raw = Vec::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("name of tensor #{i}"))?;
        let n_dims = r.u32(&format!("tensor {name}: dimension count"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.err(format!("tensor {name}: {n_dims} dimensions, expected 1..={MAX_DIMS}")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&format!("tensor {name}: dimension"))?);
        }
        let type_id = r.u32(&format!("tensor {name}: type"))?;
        let offset = r.u64(&format!("tensor {name}: offset"))?;
        raw.push((name, dims, type_id, offset));
    }

    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    if data_offset > buf.len() as u64 && !raw.is_empty() {
        return Err(r.err(format!("data section starts at {data_offset}, past the end of the {} byte file", buf.len())));
    }

    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = std::collections::HashSet::new();
    for (name, dims, type_id, offset) in raw {
        if !seen.insert(name.clone()) {
            return Err(r.err(format!("tensor {name} appears twice")));
        }
        tensors.push(tensor_info(&r, name, dims, type_id, offset, alignment, data_offset)?);
    }
    Ok(GgufHeader { version, metadata, tensors, alignment, data_offset: data_offset as usize })
}

fn tensor_info(r: &Reader, name: String, dims: Vec<u64>, type_id: u32, offset: u64, alignment: u64, data_offset: u64) -> Result<TensorInfo> {
    let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| r.err(format!("tensor {name}: unknown ggml type id {type_id}")))?;
    if dims.contains(&0) {
        return Err(r.err(format!("tensor {name}: zero-sized dimension in {dims:?}")));
    }
    let numel = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let numel = numel.filter(|&n| n <= isize::MAX as u64).ok_or_else(|| r.err(format!("tensor {name}: dims {dims:?} overflow")))?;
    let (block, block_bytes) = ggml_type.block();
    if !dims[0].is_multiple_of(block as u64) {
        return Err(r.err(format!(
            "tensor {name}: innermost dim {} is not a multiple of the {} block size {block}",
            dims[0],
            ggml_type.name()
        )));
    }
    if !offset.is_multiple_of(alignment) {
        return Err(r.err(format!("tensor {name}: offset {offset} is not aligned to {alignment}")));
    }
    // Checked: a type with more bytes than elements per block (F32: 4 per 1) can overflow
    // u64 for dims that fit; the range check below then refuses it.
    let nbytes = (numel / block as u64).checked_mul(block_bytes as u64);
    let start = data_offset.checked_add(offset);
    let end = start.zip(nbytes).and_then(|(s, n)| s.checked_add(n));
    match (start, end) {
        (Some(s), Some(e)) if e <= r.buf.len() as u64 => Ok(TensorInfo {
            name,
            shape: dims.iter().rev().map(|&d| d as usize).collect(),
            ggml_type,
            start: s as usize,
            end: e as usize,
        }),
        _ => Err(r.err(format!(
            "tensor {name}: data range {}..{} outside file of {} bytes",
            data_offset.saturating_add(offset),
            data_offset.saturating_add(offset).saturating_add(nbytes.unwrap_or(u64::MAX)),
            r.buf.len()
        ))),
    }
}
