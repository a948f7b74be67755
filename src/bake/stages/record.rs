//! Stage record: the build's entry in the manifest (checked before anything was launched, so
//! only a disk that filled up or a file changed meanwhile can fail here).

use crate::manifest;

use super::super::{Built, Error};
use super::Bake;

pub fn record(b: &Bake, built: &Built) -> Result<(), Error> {
    manifest::append(
        &b.opts.manifest,
        manifest::Build {
            build_id: built.build_id.clone(),
            recipe: built.recipe.clone(),
            name: built.name.clone(),
            ami_id: built.ami_id.clone(),
            region: b.aws.region.clone(),
            version: built.version.clone(),
            content_hash: built.content_hash.clone(),
            base_ami: built.base_ami.clone(),
            jbake_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: b.started.clone(),
            finished_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string(),
            skipped_unchanged: built.skipped_unchanged,
            distributed: built.distributed.clone(),
            tested: built.tested,
        },
    )?;
    Ok(())
}
