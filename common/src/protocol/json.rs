use serde::{Deserialize, Serialize};

/// A JSON value carried as its text. Postcard is not self-describing, so it cannot carry
/// `serde_json::Value` (which needs `deserialize_any`); the text form keeps any JSON intact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Json(pub String);

impl Json {
    /// Encodes a value.
    pub fn from_value(value: &serde_json::Value) -> Self {
        Json(value.to_string())
    }

    /// Decodes the value; an error names what was wrong with the text.
    pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// JSON `null`.
    pub fn null() -> Self {
        Json("null".to_string())
    }
}
