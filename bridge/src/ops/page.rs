//! The status page (`/`): plain HTML and JavaScript served by the node,
//! no build step and nothing fetched from elsewhere (the gateway may be
//! offline). It reads `/status.json` every five seconds and draws the last
//! hour on canvases.

/// The page.
pub(super) const HTML: &str = include_str!("status.html");
