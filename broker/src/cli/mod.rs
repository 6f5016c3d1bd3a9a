//! The `gantry` subcommands that talk to a running broker over the public
//! gRPC API (through the `gantry-worker` SDK), and `gantry bench`.

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Command {}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {}
}
