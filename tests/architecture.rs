//! The architecture as a rule CI keeps (docs/architecture.md draws it): data flows one way, source → format →
//! pipeline → sink with the cgroup governor beside the sink, the engine (`import`) on top, front ends above it.
//! This test reads `src/` and fails on a dependency between top-level modules that the table below does not
//! allow, on any cycle between them, and on file access or printing inside `format/` (formats are pure
//! functions of the bytes a source gives them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules everything may use.
const FOUNDATION: &[&str] = &["error", "sys", "size", "buffer", "bytes", "checksum"];

/// For each top-level module, what it may use besides the foundation.
const ALLOWED: &[(&str, &[&str])] = &[
    // The foundation, among itself: only these arrows, so it cannot form a cycle.
    ("error", &[]),
    ("sys", &[]),
    ("size", &["error"]),
    ("buffer", &["sys"]),
    ("bytes", &[]),
    ("checksum", &["error"]),
    // Beside the core: the cgroup readers and governor, the budget that sizes everything, progress counters.
    ("cgroup", &[]),
    ("budget", &["cgroup"]),
    ("progress", &[]),
    // The data flow.
    ("source", &[]),
    ("format", &["source"]),
    ("sink", &["cgroup"]),
    ("pipeline", &["source", "format", "sink", "progress"]),
    ("import", &["budget", "cgroup", "progress", "source", "format", "pipeline", "sink"]),
    // Front ends.
    ("process", &["cgroup", "progress"]),
    ("cdi", &["cgroup", "progress", "source", "sink", "import", "process"]),
    ("lab", &["budget", "cgroup", "progress", "source", "format", "import", "process"]),
    ("diagnose", &["cgroup", "process"]),
    // The upload server shares CDI's contract (termination messages, metrics, klog flags, environment parsing);
    // the volume and the archive job are the sink's and the engine's.
    ("upload", &["cgroup", "progress", "source", "sink", "import", "process", "cdi"]),
    (
        "cli",
        &["budget", "cgroup", "progress", "source", "sink", "import", "process", "cdi", "lab", "diagnose", "upload"],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its text up to its `#[cfg(test)]` module (tests sit at the bottom).
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = match text.find("#[cfg(test)]") {
                    Some(at) => text[..at].to_string(),
                    None => text,
                };
                out.push((path, code));
            }
        }
    }
    out.sort();
    out
}

/// The top-level module a file belongs to (`None` for lib.rs and main.rs).
fn module_of(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(src()).unwrap();
    let first = relative.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// Code without comments, so a doc line naming `crate::x` is not a dependency.
fn without_comments(code: &str) -> String {
    code.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn dependencies() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    // `crate::NAME` where NAME is a top-level module (not a macro exported at the root, like `crate::bad_image!`).
    let uses = regex::Regex::new(r"crate::([a-z_]+)\b(?:[^!]|$)").unwrap();
    let files = sources(&src());
    let modules: BTreeSet<String> = files.iter().filter_map(|(path, _)| module_of(path)).collect();
    let mut graph: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for (path, code) in files {
        let Some(module) = module_of(&path) else { continue };
        let entry = graph.entry(module.clone()).or_default();
        for used in uses.captures_iter(&without_comments(&code)) {
            let used = used[1].to_string();
            if used != module && modules.contains(&used) {
                entry.entry(used).or_insert_with(|| path.clone());
            }
        }
    }
    graph
}

#[test]
fn top_level_modules_use_only_what_the_table_allows() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    for (module, uses) in dependencies() {
        let Some(may) = allowed.get(module.as_str()) else {
            problems
                .push(format!("src/{module}: a new top-level module; place it in ALLOWED and docs/architecture.md"));
            continue;
        };
        for (used, at) in uses {
            let foundation = FOUNDATION.contains(&used.as_str()) && !FOUNDATION.contains(&module.as_str());
            if !may.contains(&used.as_str()) && !foundation {
                problems.push(format!("{module} -> {used} is not allowed ({})", at.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph: BTreeMap<String, BTreeSet<String>> =
        dependencies().into_iter().map(|(m, uses)| (m, uses.into_keys().collect())).collect();
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("cycle between top-level modules: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn formats_neither_open_files_nor_print() {
    let forbidden = regex::Regex::new(
        r"std::fs\b|\bFile::|OpenOptions|canonicalize|\bopenat|println!|eprintln!|\bprint!|eprint!|dbg!|std::io::stdout|std::io::stderr",
    )
    .unwrap();
    let mut problems = Vec::new();
    for (path, code) in sources(&src().join("format")) {
        for (n, line) in without_comments(&code).lines().enumerate() {
            if let Some(found) = forbidden.find(line) {
                problems.push(format!("{}:{}: {}", path.display(), n + 1, found.as_str()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "format/ must stay pure (ask source::files for files, log through `log`):\n{}",
        problems.join("\n")
    );
}

#[test]
fn front_ends_never_touch_the_destination() {
    // The CDI front ends ask `sink::volume` and the engine for everything done to a volume; what they write
    // themselves is their own report (the termination log and the done file, in cdi/termination.rs).
    let forbidden = regex::Regex::new(
        r"\bFile::create|OpenOptions|remove_file|remove_dir|create_dir|set_len|\bfs::write\b|\bfs::rename|\bfs::copy|\bunlinkat?\b|fallocate|\bsyncfs\b",
    )
    .unwrap();
    let own_report = src().join("cdi").join("termination.rs");
    let mut problems = Vec::new();
    for dir in ["cdi", "upload"] {
        for (path, code) in sources(&src().join(dir)) {
            if path == own_report {
                continue;
            }
            // Unit tests build their fixtures as they like.
            let code = code.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, line) in without_comments(code).lines().enumerate() {
                if let Some(found) = forbidden.find(line) {
                    problems.push(format!("{}:{}: {}", path.display(), n + 1, found.as_str()));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "a front end touches a volume itself (ask sink::volume or the engine):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_budget_is_resolved_in_one_place() {
    let mut callers = Vec::new();
    for (path, code) in sources(&src()) {
        if path.ends_with("budget.rs") {
            continue;
        }
        for (n, line) in without_comments(&code).lines().enumerate() {
            if line.contains("Budget::resolve(") {
                callers.push(format!("{}:{}", path.display(), n + 1));
            }
        }
    }
    assert_eq!(callers.len(), 1, "Budget::resolve is called from {callers:?}: resolve through import::Context");
    assert!(callers[0].contains("src/import/mod.rs"), "{callers:?}");
}

#[test]
fn the_rules_see_real_dependencies() {
    // The scan must find the arrows it polices, or every other test here passes vacuously.
    let graph = dependencies();
    assert!(graph["pipeline"].contains_key("format"), "{graph:?}");
    assert!(graph["import"].contains_key("pipeline"), "{graph:?}");
    assert!(graph["format"].contains_key("source"), "{graph:?}");
    let planted = "use crate::pipeline::fill;\n// use crate::cdi::x;\ncrate::bad_image!(\"x\");\n";
    let uses = regex::Regex::new(r"crate::([a-z_]+)\b(?:[^!]|$)").unwrap();
    let found: Vec<_> = uses.captures_iter(&without_comments(planted)).map(|c| c[1].to_string()).collect();
    assert_eq!(found, ["pipeline"]);
}
