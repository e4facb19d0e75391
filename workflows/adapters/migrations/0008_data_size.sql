-- Each document's size: the UTF-8 bytes of its text (data_text), written by every insert.
-- A list page ends once its documents pass LIST_PAGE_BYTES (ListWorkflows); json has no
-- binary cast to text, so reading the size from data_text would fetch and copy every
-- document of the page's range, while this column is read from the row. Rows stored
-- before this migration have none, and their size is read from their text. Nullable, no
-- default: adding it rewrites nothing.
ALTER TABLE workflows ADD COLUMN data_size integer;
