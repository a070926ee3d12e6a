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

/// Text a peer sent, made safe for a log line: control characters (line breaks, escape
/// sequences that would drive a terminal) written as escapes, and at most `max_chars`
/// characters kept, so that a peer can neither forge log lines nor flood them.
pub fn printable(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == max_chars {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_text_cannot_break_or_colour_a_log_line() {
        assert_eq!(
            printable("ok\nFAKE line\u{1b}[31m", 100),
            "ok\\nFAKE line\\u{1b}[31m"
        );
        assert_eq!(printable("abcdef", 3), "abc...");
        assert_eq!(printable("\u{e9}t\u{e9}", 10), "\u{e9}t\u{e9}");
    }

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
