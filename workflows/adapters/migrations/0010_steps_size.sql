-- Each workflow's steps' share of a list page's budget (LIST_PAGE_BYTES): each name's UTF-8
-- bytes and 3 more (domain.model.steps_size), written by every insert. A page counted its
-- documents only, so 134 workflows of {"a":1} with 1 MiB of steps each (209,000 names)
-- made a page of 106 MB, 3 GB of a worker's memory. Rows stored before this migration
-- have none, and theirs is computed from their steps. Nullable, no default: adding it
-- rewrites nothing.
ALTER TABLE workflows ADD COLUMN steps_size integer;
