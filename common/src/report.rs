//! Errors for people: a chain of causes as one line, each cause said once.

/// `err` and its causes joined by ": ", skipping a cause whose text an outer message
/// already includes (many errors print their source in their own message), with line
/// breaks folded so that a log or a terminal shows one line.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(err);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = cause.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let err = Outer {
            source: std::io::Error::other("gone\nreally"),
        };
        assert_eq!(one_line(&err), "cannot read x: gone really");
    }
}
