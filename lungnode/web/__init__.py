"""The reading-room page: a worklist and a per-study page served beside the JSON API (no build step)."""
