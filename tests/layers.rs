//! The crates' modules form layers: no top-level module of a crate refers (by a `crate::`
//! path, outside comments and test modules) to a module that refers back to it, directly or
//! through others. ARCHITECTURE.md §1 states the rule; this test keeps it true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The top-level module each `crate::name` path outside comments and `#[cfg(test)]` code of
/// `text` names.
fn references(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let code: String = code
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut refs = BTreeSet::new();
    {
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::x, b, c::{..}}`, over one line or several.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            refs.insert(first_segment(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
                refs.insert(first_segment(&item));
            } else {
                refs.insert(first_segment(rest));
            }
        }
    }
    refs.retain(|r| !r.is_empty());
    refs
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Each top-level module of the crate in `src` and the top-level modules it refers to.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if matches!(top.as_str(), "lib" | "main" | "bin") {
                continue;
            }
            let refs = references(&std::fs::read_to_string(&path).unwrap());
            graph
                .entry(top.clone())
                .or_default()
                .extend(refs.into_iter().filter(|r| *r != top));
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for refs in graph.values_mut() {
        refs.retain(|r| modules.contains(r));
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let here = path.last().unwrap().clone();
        for next in &graph[&here] {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    walk(graph, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn no_module_refers_back_to_a_module_that_refers_to_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let crates = [
        "src",
        "pipeline/src",
        "sources/src",
        "sinks/src",
        "analytics/src",
        "campaigns/src",
        "printers/src",
        "tracking/src",
        "net/src",
    ];
    let mut cycles = Vec::new();
    let mut modules = 0;
    for c in crates {
        let graph = module_graph(&root.join(c));
        modules += graph.len();
        for m in graph.keys() {
            if let Some(cycle) = cycle_from(&graph, m) {
                cycles.push(format!("{c}: {}", cycle.join(" -> ")));
            }
        }
    }
    assert!(modules > 50, "only {modules} modules found");
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn references_are_read_from_paths_and_use_groups_but_not_comments_or_tests() {
    let text = "use crate::a::X;\nuse crate::{b, c::{D, E}, d::f};\nuse crate::{\n    l::M,\n    n,\n};\n// crate::g\nlet x = crate::h::k(); // crate::i\n#[cfg(test)]\nmod tests { use crate::j; }\n";
    let want: BTreeSet<String> = ["a", "b", "c", "d", "h", "l", "n"].map(String::from).into();
    assert_eq!(references(text), want);
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycle_from(&graph, "a").unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(cycle_from(&graph, "d"), None);
}
