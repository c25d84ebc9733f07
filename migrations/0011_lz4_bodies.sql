-- Message bodies (text and sanitized HTML) are compressed with lz4 instead of pglz where
-- Postgres offers it (version 14 and later, built with lz4, as the common packages are):
-- storing a batch spent about a third of its database time in pglz; lz4 takes a quarter
-- of that for slightly larger rows. Rows stored before keep their compression; reading
-- is unchanged. Without lz4 the bodies stay with pglz and a notice says so.
do $$
begin
    execute 'alter table ticket_messages
                 alter column body_text set compression lz4,
                 alter column body_html set compression lz4';
exception when feature_not_supported or syntax_error or invalid_parameter_value then
    raise notice 'lz4 compression is not available here: message bodies keep pglz (%)', sqlerrm;
end
$$;
