//! `boundimport upload-server`: a drop-in for KubeVirt CDI's `cdi-uploadserver`, the HTTPS server behind
//! `virtctl image-upload` and host-assisted clones, with the import engine's memory bound.
//!
//! It reads the pod's environment ([`env`](mod@env)), serves CDI's routes over TLS with client-certificate
//! verification ([`tls`], [`server`], [`http`], [`multipart`]), hands each upload body to the engine as a
//! forward-only stream or extracts it ([`process`]), and reports in the termination log as CDI does: `Upload
//! Complete` / `Clone Complete` with `preallocationApplied`, or `Deadline Passed` with `deadlinePassed`, exit 0;
//! any fatal failure a plain line and exit 1.

pub mod env;
pub mod http;
pub mod multipart;
pub mod process;
pub mod server;
pub mod tls;

use crate::cdi::termination::{self, TerminationMessage};
use crate::cdi::PodArgs;
use crate::sink::volume::{self as dest, Volume};
use env::UploadEnv;
use process::Job;
use server::{Ended, Server};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Options of `boundimport upload-server`. Everything else comes from the environment CDI's controller sets.
#[derive(Debug, Clone, clap::Args)]
pub struct UploadArgs {
    /// What both pods take.
    #[command(flatten)]
    pub pod: PodArgs,

    /// Keep answering (409 to uploads) this many seconds after an upload completed (default: exit at once).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub linger: f64,

    /// Fail an upload whose client sends nothing for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub body_timeout: f64,
}

/// Runs the upload server; returns the process exit code.
pub fn main(args: UploadArgs) -> i32 {
    args.pod.klog.init_logging();
    match run(&args) {
        Ok(Ended::Done(done)) => {
            log::info!("UploadServer successfully exited");
            report_json(
                &args.pod.termination_log,
                &TerminationMessage::upload_complete(done.clone, done.preallocation_applied),
            )
        }
        Ok(Ended::DeadlinePassed) => report_json(&args.pod.termination_log, &TerminationMessage::deadline_passed()),
        Ok(Ended::Stopped) => {
            let signal = crate::process::exit_code(&crate::error::Error::interrupted(Path::new("upload"), 0));
            fail(&args.pod.termination_log, "UploadServer failed: stopped by a signal before an upload completed");
            if signal > 128 {
                signal
            } else {
                1
            }
        }
        Ok(Ended::Failed(message)) => fail(&args.pod.termination_log, &format!("UploadServer failed: {message}")),
        Err(message) => fail(&args.pod.termination_log, &format!("UploadServer failed: {message}")),
    }
}

fn report_json(path: &Path, message: &TerminationMessage) -> i32 {
    log::info!("{}", message.to_json());
    match termination::write_json(path, message) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{}: cannot write the termination message: {e}", path.display());
            1
        }
    }
}

fn fail(path: &Path, message: &str) -> i32 {
    log::error!("{message}");
    if let Err(e) = termination::write_plain(path, message) {
        log::error!("{}: cannot write the termination message: {e}", path.display());
    }
    1
}

/// Where uploads go: `DESTINATION` mapped onto the path options.
fn destination(args: &UploadArgs, configured: Option<&Path>) -> (Volume, PathBuf) {
    match configured {
        None => (Volume::Filesystem(args.pod.data_dir.clone()), args.pod.data_dir.join(dest::DISK_IMAGE_NAME)),
        Some(path) if path == Path::new(env::WRITE_FILE_PATH) => {
            (Volume::Filesystem(args.pod.data_dir.clone()), args.pod.data_dir.join(dest::DISK_IMAGE_NAME))
        }
        Some(path) if path == Path::new(env::WRITE_BLOCK_PATH) => {
            (Volume::Block(args.pod.block_path.clone()), args.pod.block_path.clone())
        }
        Some(path) if dest::is_block_device(path) => (Volume::Block(path.to_path_buf()), path.to_path_buf()),
        Some(path) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            (Volume::Filesystem(dir.to_path_buf()), path.to_path_buf())
        }
    }
}

fn run(args: &UploadArgs) -> Result<Ended, String> {
    let env = UploadEnv::from_process().map_err(|e| e.to_string())?;
    for warning in &env.warnings {
        log::warn!("{warning}");
    }
    let files = tls::TlsFiles {
        cert: env.tls_cert_file.as_deref(),
        key: env.tls_key_file.as_deref(),
        client_ca: env.client_cert_file.as_deref(),
        ciphers: &env.ciphers,
        min_version: env.min_tls_version.as_deref(),
    };
    let (tls, notes) = tls::server_config(&files).map_err(|e| e.to_string())?;
    for note in notes {
        log::warn!("{note}");
    }
    let (volume, image) = destination(args, env.destination.as_deref());
    if let Volume::Block(device) = &volume {
        if !dest::is_block_device(device) {
            return Err(format!("{}: the block destination is not a block device", device.display()));
        }
    }
    log::info!("destination: {volume:?}, image {}", image.display());
    let ctx = crate::import::Context::for_pod();
    let budget = Some(ctx.budget.bytes);
    let job = Job {
        volume,
        image,
        data_dir: args.pod.data_dir.clone(),
        scratch: args.pod.scratch_dir.is_dir().then(|| args.pod.scratch_dir.clone()),
        image_size: env.image_size,
        filesystem_overhead: env.filesystem_overhead,
        preallocation: env.preallocation,
        ctx,
    };
    let address = env.bind_address();
    let listener =
        TcpListener::bind(&address).map_err(|e| format!("Error creating upload listener on {address}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("Error creating upload listener: {e}"))?;
    let stop = crate::process::install_stop_handlers();
    let body_timeout = Duration::from_secs_f64(args.body_timeout.clamp(1.0, 86_400.0));
    let server = Server::new(tls, env.client_name.clone(), job, budget, stop, body_timeout);
    server.serve(listener).map_err(|e| e.to_string())?;
    log::info!("Running server on {bound} (https)");
    let linger = Duration::from_secs_f64(args.linger.clamp(0.0, 3600.0));
    Ok(server.wait(env.deadline, linger))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: UploadArgs,
    }

    #[test]
    fn destinations_map_onto_the_path_options() {
        let args = Wrapper::parse_from(["x", "--data-dir", "/d", "--block-path", "/b"]).args;
        assert_eq!(destination(&args, None), (Volume::Filesystem("/d".into()), "/d/disk.img".into()));
        assert_eq!(
            destination(&args, Some(Path::new("/data/disk.img"))),
            (Volume::Filesystem("/d".into()), "/d/disk.img".into())
        );
        assert_eq!(
            destination(&args, Some(Path::new("/dev/cdi-block-volume"))),
            (Volume::Block("/b".into()), "/b".into())
        );
        assert_eq!(
            destination(&args, Some(Path::new("/elsewhere/x.img"))),
            (Volume::Filesystem("/elsewhere".into()), "/elsewhere/x.img".into())
        );
    }
}
