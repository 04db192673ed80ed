-- A digest template per organisation and locale (issue 11): Mustache for the subject, the text
-- and the HTML of the digest email; without one the built-in default (HeraldCore DigestTemplate)
-- renders it. The recipient's locale picks it with the usual fallback (their locale, its
-- language, the organisation's, its language, en).

CREATE TABLE digest_templates (
    organisation_id uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    locale          text NOT NULL CONSTRAINT digest_templates_locale_valid CHECK (length(locale) BETWEEN 2 AND 35),
    subject         text NOT NULL,
    body            text NOT NULL,
    html            text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT digest_templates_pkey PRIMARY KEY (organisation_id, locale)
);
ALTER TABLE digest_templates ENABLE ROW LEVEL SECURITY;
ALTER TABLE digest_templates FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON digest_templates
    USING (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid)
    WITH CHECK (organisation_id = nullif(current_setting('app.org_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON digest_templates TO herald_app;
GRANT SELECT ON digest_templates TO herald_worker;
