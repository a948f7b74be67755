use std::process::ExitCode;

use clap::Parser;
use jbake::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(|| MaskedStderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JBAKE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            jbake::progress::err_line(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // A closed stderr (`jbake … 2>&1 | head`) is not a reason to panic now; errors can
            // quote what a command printed, rendered or was told: never a secret.
            jbake::progress::err_line(&format!(
                "error: {}",
                jbake::util::mask_registered(&failure.to_string())
            ));
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Standard error for the internal logs (`JBAKE_LOG=debug`), with the secrets jbake knows of
/// masked: a log event is written in one piece, so it is masked whole.
struct MaskedStderr;

impl std::io::Write for MaskedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(jbake::util::mask_registered(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
