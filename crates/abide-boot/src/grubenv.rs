//! The GRUB environment block (`grubenv`): the file GRUB's `load_env` and `save_env` and the
//! `grub-editenv` tool read and write.
//!
//! Layout: the signature line `# GRUB Environment Block\n`, then `NAME=VALUE\n` lines in
//! which a backslash or a newline inside a value is preceded by a backslash, then `#` bytes
//! up to the block's fixed size (1024 bytes by default; GRUB never changes it, since it writes
//! the block in place). Lines starting with `#` are comments. The block is edited in memory
//! and serialized whole, so a writer replaces it in one piece.

/// The first line of every environment block.
pub const SIGNATURE: &[u8] = b"# GRUB Environment Block\n";
/// The size `grub-editenv create` gives a block.
pub const DEFAULT_SIZE: usize = 1024;

/// What can be wrong with an environment block or an edit of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrubEnvError {
    /// The bytes do not start with the signature.
    #[error(
        "not a GRUB environment block: it does not start with {:?}",
        String::from_utf8_lossy(SIGNATURE)
    )]
    Signature,
    /// A line is not `NAME=VALUE` or a comment.
    #[error("GRUB environment block line {line} is not NAME=VALUE")]
    Line {
        /// The 1-based line number.
        line: usize,
    },
    /// The block is not text.
    #[error("GRUB environment block is not UTF-8 text")]
    NotText,
    /// A variable name GRUB could not read back.
    #[error(
        "bad GRUB variable name {0:?}: it must be non-empty and hold no '=', '#', NUL or white space"
    )]
    Name(String),
    /// A value holds NUL.
    #[error("the value of {0} holds a NUL byte")]
    Value(String),
    /// The variables do not fit into the block.
    #[error("the variables need {need} bytes but the block holds {size}")]
    Full {
        /// Bytes needed.
        need: usize,
        /// The block size.
        size: usize,
    },
}

/// An environment block in memory: its variables in file order, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubEnv {
    size: usize,
    vars: Vec<(String, String)>,
}

impl Default for GrubEnv {
    fn default() -> Self {
        GrubEnv::new(DEFAULT_SIZE)
    }
}

impl GrubEnv {
    /// An empty block of `size` bytes.
    pub fn new(size: usize) -> GrubEnv {
        GrubEnv {
            size,
            vars: Vec::new(),
        }
    }

    /// Parses a block; its length is its size.
    pub fn parse(block: &[u8]) -> Result<GrubEnv, GrubEnvError> {
        let body = block
            .strip_prefix(SIGNATURE)
            .ok_or(GrubEnvError::Signature)?;
        let text = std::str::from_utf8(body).map_err(|_| GrubEnvError::NotText)?;
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut chars = text.chars().peekable();
        let mut line = 1;
        while let Some(&c) = chars.peek() {
            line += 1;
            if c == '#' {
                // A comment, or the padding: up to the end of the line or the block.
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                continue;
            }
            let mut name = String::new();
            let mut value = String::new();
            let mut in_value = false;
            let mut ended = false;
            while let Some(c) = chars.next() {
                match (in_value, c) {
                    (false, '=') => in_value = true,
                    (false, '\n') => return Err(GrubEnvError::Line { line }),
                    (false, c) => name.push(c),
                    (true, '\\') => match chars.next() {
                        Some(escaped) => value.push(escaped),
                        None => return Err(GrubEnvError::Line { line }),
                    },
                    (true, '\n') => {
                        ended = true;
                        break;
                    }
                    (true, c) => value.push(c),
                }
            }
            if !ended || !valid_name(&name) {
                return Err(GrubEnvError::Line { line });
            }
            match vars.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = value,
                None => vars.push((name, value)),
            }
        }
        Ok(GrubEnv {
            size: block.len(),
            vars,
        })
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The variables in file order.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// Sets `name` to `value` (in memory; nothing is written). Refuses what GRUB could not
    /// read back, and anything that would not fit into the block, leaving it unchanged.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), GrubEnvError> {
        if !valid_name(name) {
            return Err(GrubEnvError::Name(name.to_owned()));
        }
        if value.contains('\0') {
            return Err(GrubEnvError::Value(name.to_owned()));
        }
        let mut next = self.clone();
        match next.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.to_owned(),
            None => next.vars.push((name.to_owned(), value.to_owned())),
        }
        next.to_block()?;
        *self = next;
        Ok(())
    }

    /// Removes `name` (in memory).
    pub fn unset(&mut self, name: &str) {
        self.vars.retain(|(n, _)| n != name);
    }

    /// The block's bytes: signature, variables, `#` padding to the block size.
    pub fn to_block(&self) -> Result<Vec<u8>, GrubEnvError> {
        let mut out = SIGNATURE.to_vec();
        for (name, value) in &self.vars {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            for b in value.bytes() {
                if b == b'\\' || b == b'\n' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            out.push(b'\n');
        }
        if out.len() > self.size {
            return Err(GrubEnvError::Full {
                need: out.len(),
                size: self.size,
            });
        }
        out.resize(self.size, b'#');
        Ok(out)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('#')
        && !name
            .chars()
            .any(|c| c == '=' || c == '\0' || c.is_whitespace())
}
