//! The boundimport binary: a thin dispatch into the library's command-line front end.

fn main() {
    std::process::exit(boundimport::cli::main());
}
