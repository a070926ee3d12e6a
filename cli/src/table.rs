//! Readable tables of the API's answers.

use serde_json::Value;

/// Left-aligned columns, a header, and a dash for missing values.
fn render(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn rows(value: &Value, keys: &[&str]) -> Vec<Vec<String>> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| keys.iter().map(|key| cell(&item[*key])).collect())
                .collect()
        })
        .unwrap_or_default()
}

pub fn edges(value: &Value) -> String {
    let keys = [
        "id",
        "name",
        "online",
        "owner",
        "epoch",
        "rtt_ms",
        "last_seen",
        "failover",
    ];
    let mut rows = rows(value, &keys);
    // A site pair's nodes: `site-1a*` holds, `site-1b-` is offline.
    let nodes = |edge: &Value| {
        edge["nodes"]
            .as_array()
            .filter(|nodes| !nodes.is_empty())
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|node| {
                        let mark = match (node["role"].as_str(), node["online"].as_bool()) {
                            (_, Some(false)) => "-",
                            (Some("holder"), _) => "*",
                            _ => "",
                        };
                        format!("{}{mark}", cell(&node["id"]))
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| "-".into())
    };
    if let Some(edges) = value.as_array() {
        for (row, edge) in rows.iter_mut().zip(edges) {
            row.push(nodes(edge));
        }
    }
    render(
        &[
            "ID",
            "NAME",
            "ONLINE",
            "OWNER",
            "EPOCH",
            "RTT MS",
            "LAST SEEN",
            "FAILOVER",
            "NODES (*HOLDS, -OFFLINE)",
        ],
        rows,
    )
}

pub fn masters(value: &Value) -> String {
    let list = |v: &Value| {
        v.as_array()
            .filter(|items| !items.is_empty())
            .map(|items| items.iter().map(cell).collect::<Vec<_>>().join(","))
            .unwrap_or_else(|| "-".into())
    };
    let rows = value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|master| {
                    vec![
                        cell(&master["id"]),
                        cell(&master["api_url"]),
                        cell(&master["alive"]),
                        list(&master["edges"]),
                        list(&master["units"]),
                        master["lease_age_ms"]
                            .as_u64()
                            .map_or_else(|| "-".into(), |ms| format!("{} s", ms / 1000)),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    render(
        &[
            "ID",
            "API",
            "ALIVE",
            "EDGES LINKED",
            "UNITS RUN",
            "LEASE AGE",
        ],
        rows,
    )
}

pub fn systems(value: &Value) -> String {
    let rows = value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|system| {
                    vec![
                        cell(&system["id"]),
                        cell(&system["name"]),
                        cell(&system["edge"]),
                        system["modules"].as_array().map_or(0, Vec::len).to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    render(&["ID", "NAME", "EDGE", "MODULES"], rows)
}

pub fn system(value: &Value) -> String {
    let mut out = format!("{} ({})\n", cell(&value["name"]), cell(&value["id"]));
    let keys = ["name", "index", "id", "driver", "runs_on", "state"];
    out.push_str(&render(
        &["MODULE", "INDEX", "ID", "DRIVER", "RUNS ON", "STATE"],
        rows(&value["members"], &keys),
    ));
    out
}

pub fn executed(value: &Value) -> String {
    format!(
        "{}\n(executed by {})\n",
        cell(&value["result"]),
        cell(&value["executed_by"])
    )
}

pub fn status(value: &Value) -> String {
    let rows = value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(key, value)| vec![key.clone(), value.to_string()])
                .collect()
        })
        .unwrap_or_default();
    render(&["KEY", "VALUE"], rows)
}

pub fn restored(value: &Value) -> String {
    format!(
        "edge {} is controlled by the {} (epoch {})\n",
        cell(&value["edge"]),
        cell(&value["owner"]),
        cell(&value["epoch"])
    )
}

pub fn audit(value: &Value) -> String {
    let keys = ["time", "event", "edge", "from", "to", "epoch", "reason"];
    render(
        &["TIME", "EVENT", "EDGE", "FROM", "TO", "EPOCH", "REASON"],
        rows(value, &keys),
    )
}

/// A pull's or reset's answer.
pub fn moved(value: &Value) -> String {
    let list = |key: &str| {
        let items: Vec<String> = value[key]
            .as_array()
            .map(|a| a.iter().map(cell).collect())
            .unwrap_or_default();
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    if value["changed"] == false {
        return format!(
            "repository {} stays at {}\n",
            cell(&value["repository"]),
            cell(&value["commit"])
        );
    }
    format!(
        "repository {} moved {} -> {}\nfiles changed: {}\ndrivers reloaded: {}\n",
        cell(&value["repository"]),
        cell(&value["previous"]),
        cell(&value["commit"]),
        list("files"),
        list("drivers")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_line_up_and_missing_values_show_a_dash() {
        let table = edges(&json!([
            {"id": "site-1", "name": "North", "online": true, "owner": "edge", "epoch": 3,
             "rtt_ms": 0.4, "last_seen": "2026-11-22T10:00:00Z", "failover": true},
            {"id": "s2", "name": "South campus", "online": false, "owner": "master", "epoch": 12}
        ]));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        let column = |line: &str| {
            line.find("OWNER")
                .or_else(|| line.find("edge"))
                .or_else(|| line.find("master"))
        };
        assert_eq!(column(lines[0]), column(lines[1]));
        assert_eq!(column(lines[1]), column(lines[2]));
        assert!(lines[2].contains(" - "), "{table}");
        let pair = edges(&json!([
            {"id": "site-1", "nodes": [
                {"id": "site-1a", "online": false, "role": "standby"},
                {"id": "site-1b", "online": true, "role": "holder"}]}
        ]));
        assert!(pair.contains("site-1a-,site-1b*"), "{pair}");
    }
}
