//! Stage share: `--share-with` accounts may launch the image and each of its copies (launch
//! permissions; the snapshots need none of their own for a launch). Whether the image can be
//! shared at all (not encrypted with the AWS managed `aws/ebs` key) was checked before the bake
//! ([`check_keys`](super::super::distribute::check_keys)); what each account still needs on the
//! customer managed keys is said here.
//!
//! Nothing to undo: the permissions go with the image (and its copies) if the build fails.

use crate::aws::{wait, Aws};

use super::super::distribute::{self, Ctx, RegionKey, Source};
use super::super::Error;
use super::copy::Copied;
use super::settle;

pub async fn share(
    ctx: &Ctx<'_>,
    source: &Source,
    copies: &[Copied],
    keys: &[RegionKey],
) -> Result<(), Error> {
    let accounts = &ctx.dist.share_with;
    if accounts.is_empty() {
        return Ok(());
    }
    ctx.progress.info(
        "stage",
        &format!(
            "sharing {} with {} (launch permissions)",
            source.image.id,
            accounts.join(", ")
        ),
    );
    share_one(ctx, ctx.aws, &source.image.id).await?;
    for c in copies {
        let aws = ctx.aws.in_region(&c.region).await;
        share_one(ctx, &aws, &c.id).await?;
        ctx.progress.info(
            "shared",
            &format!(
                "shared {} in {} with {}",
                c.id,
                c.region,
                accounts.join(", ")
            ),
        );
    }
    if let Some(needed) = distribute::grants_needed(accounts, keys) {
        ctx.progress.info("shared", &needed);
    }
    Ok(())
}

/// Launch permissions on one image; a copy EC2 does not show everywhere yet is waited for.
async fn share_one(ctx: &Ctx<'_>, aws: &Aws, image: &str) -> Result<(), Error> {
    let accounts = &ctx.dist.share_with;
    settle(
        ctx.progress,
        &format!("image {image} in {} to take launch permissions", aws.region),
        || async {
            match aws.ec2.share_image(image, accounts).await {
                Ok(()) => Ok(wait::Poll::Ready(())),
                Err(e) if e.is_not_found() => Ok(wait::Poll::Pending("not visible yet".into())),
                Err(e) => Err(e),
            }
        },
    )
    .await
}
