import Foundation
import HeraldCore
import PostgresNIO

/// An organisation's digest template for one locale (migration 0016).
public struct DigestTemplateRecord: Sendable, Equatable {
    public var locale: String
    public var content: TemplateContent
    public var updatedAt: Date
}

extension DigestTemplateRecord {
    init(_ row: PostgresRow) throws {
        let (locale, subject, body, html, updated) = try row.decode((String, String, String, String?, Date).self, table: "digest_templates")
        self.init(locale: locale, content: TemplateContent(subject: subject, body: body, html: html), updatedAt: updated)
    }
}

extension TenantTransaction {
    /// The organisation's digest templates, by locale.
    public func digestTemplates() async throws -> [DigestTemplateRecord] {
        try await query(
            "SELECT locale, subject, body, html, updated_at FROM digest_templates WHERE organisation_id = \(organisationID) ORDER BY locale"
        ).map(DigestTemplateRecord.init)
    }

    /// The digest template stored for exactly `locale`, if any (no fallback).
    public func digestTemplate(locale: String) async throws -> DigestTemplateRecord? {
        try await query(
            """
            SELECT locale, subject, body, html, updated_at FROM digest_templates
            WHERE organisation_id = \(organisationID) AND locale = \(locale)
            """
        ).first.map(DigestTemplateRecord.init)
    }

    /// Sets the digest template of `locale` (validated by the caller).
    public func putDigestTemplate(locale: String, content: TemplateContent) async throws -> DigestTemplateRecord {
        try await query(
            """
            INSERT INTO digest_templates (organisation_id, locale, subject, body, html)
            VALUES (\(organisationID), \(locale), \(content.subject), \(content.body), \(content.html))
            ON CONFLICT (organisation_id, locale) DO UPDATE
                SET subject = excluded.subject, body = excluded.body, html = excluded.html, updated_at = now()
            """)
        guard let record = try await digestTemplate(locale: locale) else {
            throw StoreError.notFound("digest template")
        }
        return record
    }

    public func deleteDigestTemplate(locale: String) async throws {
        let rows = try await query(
            "DELETE FROM digest_templates WHERE organisation_id = \(organisationID) AND locale = \(locale) RETURNING locale")
        guard !rows.isEmpty else { throw StoreError.notFound("digest template") }
    }
}
