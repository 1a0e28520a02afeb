//! One error type for the harness: a chain of lowercase contexts, the
//! primary cause last, and (for guest failures) the console tail.

use std::fmt;

pub type Result<T> = std::result::Result<T, Error>;

pub struct Error {
    /// Outermost context first, root cause last.
    chain: Vec<String>,
    /// Last lines of the guest's serial console, when a guest was involved.
    console_tail: Option<String>,
}

impl Error {
    pub fn msg(m: impl Into<String>) -> Error {
        Error {
            chain: vec![m.into()],
            console_tail: None,
        }
    }

    pub fn with_console_tail(mut self, tail: String) -> Error {
        if self.console_tail.is_none() {
            self.console_tail = Some(tail);
        }
        self
    }

    pub fn console_tail(&self) -> Option<&str> {
        self.console_tail.as_deref()
    }

    fn push_context(mut self, c: String) -> Error {
        self.chain.insert(0, c);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.chain.join(": "))?;
        if let Some(tail) = &self.console_tail {
            write!(f, "\n----- console tail -----\n{}", tail.trim_end())?;
            write!(f, "\n----- end of console -----")?;
        }
        Ok(())
    }
}

// `unwrap()`/`expect()` in tests print Debug: make it the readable form.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// Like anyhow: `Error` is not itself a `std::error::Error`, so every error
// type converts into it (`?`, `.context()`), io and serde_json alike.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for Error {
    fn from(e: E) -> Error {
        Error::msg(e.to_string())
    }
}

pub trait Context<T> {
    fn context(self, c: &str) -> Result<T>;
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, c: &str) -> Result<T> {
        self.map_err(|e| e.into().push_context(c.to_string()))
    }
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|e| e.into().push_context(f()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, c: &str) -> Result<T> {
        self.ok_or_else(|| Error::msg(c))
    }
    fn with_context<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.ok_or_else(|| Error::msg(f()))
    }
}

#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::msg(format!($($arg)*))) };
}
