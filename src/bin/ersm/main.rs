//! The `ersm` binary: the library's command line (`ersm::cli`).

fn main() {
    std::process::exit(ersm::cli::main(std::env::args_os()));
}
