import Foundation
import HeraldCore
import HeraldStore

/// The catalogue as one document (issue 8): an organisation set up from a file kept in the
/// tenant's repository, applied in one transaction, idempotent.
extension HeraldService {
    func exportCatalogue(_ input: Operations.ExportCatalogue.Input) async throws -> Operations.ExportCatalogue.Output {
        let document = try await tenant { tx, principal in try await catalogueDocument(tx, for: principal) }
        return .ok(.init(body: .json(document)))
    }

    func importCatalogue(_ input: Operations.ImportCatalogue.Input) async throws -> Operations.ImportCatalogue.Output {
        guard case .json(let document) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let plan = try CataloguePlan(document)
        let after = try await tenant { tx, principal in
            // The defaults are the organisation's settings: the permission of PUT /v1/preference-defaults.
            if document.preferenceDefaults != nil, !principal.permissions.contains(.organisationManage) {
                throw APIError.forbidden(.organisationManage)
            }
            let before = try await catalogueDocument(tx, for: principal)
            let summary = try await apply(plan, document, tx)
            let after = try await catalogueDocument(tx, for: principal)
            if after != before {
                try await tx.audit(
                    action: "catalogue.import", targetType: "organisation", targetID: tx.organisationID.lowercased,
                    before: nil, after: try auditValue(summary))
            }
            return after
        }
        return .ok(.init(body: .json(after)))
    }

    /// The current catalogue, in the document's shape and a stable order. The preference
    /// defaults are in it only for a caller who may read them (`organisation.manage`, as `GET
    /// /v1/organisation/preference-defaults`), so that a key with `templates.manage` alone can
    /// export the document and apply it again.
    func catalogueDocument(_ tx: TenantTransaction, for principal: Principal) async throws -> Components.Schemas.Catalogue {
        let categories = try await tx.categories().sorted { $0.key < $1.key }
        let types = try await tx.notificationTypes()
        return .init(
            categories: categories.map { .init(key: $0.key, name: $0.name, description: $0.description, critical: $0.critical) },
            types: try types.map { type in
                let api = try Components.Schemas.NotificationType(type)
                return .init(
                    key: api.key, category: api.category, name: api.name, description: api.description,
                    defaultSeverity: api.defaultSeverity, defaultPriority: api.defaultPriority, defaultChannels: api.defaultChannels,
                    templates: api.templates.map {
                        .init(channel: $0.channel, locale: $0.locale, subject: $0.subject, body: $0.body, html: $0.html)
                    })
            },
            preferenceDefaults: principal.permissions.contains(.organisationManage)
                ? try await preferenceList(try await tx.preferenceDefaults(), tx).items : nil,
            digestTemplates: try await tx.digestTemplates().map {
                .init(locale: $0.locale, subject: $0.content.subject, body: $0.content.body, html: $0.content.html)
            })
    }

    /// Writes the document: categories, then types and their templates, then defaults.
    private func apply(
        _ plan: CataloguePlan, _ document: Components.Schemas.Catalogue, _ tx: TenantTransaction
    ) async throws -> CatalogueSummary {
        var summary = CatalogueSummary()
        for category in plan.categories {
            if let existing = try await tx.category(key: category.key) {
                _ = try await tx.updateCategory(
                    existing.id, name: category.name, description: category.description, critical: category.critical)
            } else {
                _ = try await tx.createCategory(
                    key: category.key, name: category.name, description: category.description, critical: category.critical)
            }
            summary.categories += 1
        }
        for (index, type) in plan.types.enumerated() {
            guard let category = try await tx.category(key: type.categoryKey) else {
                throw APIError.unprocessable(
                    ValidationError(
                        field: "types[\(index)].category",
                        message: "\"\(type.categoryKey)\" is not a category of this document or your organisation."))
            }
            var fields = type.fields
            fields.categoryID = category.id
            let stored: HeraldStore.NotificationType
            if let existing = try await tx.notificationType(key: type.fields.key) {
                stored = try await tx.updateNotificationType(existing.id, fields)
            } else {
                stored = try await tx.createNotificationType(fields)
            }
            let wanted = Set(type.templates.map { "\($0.channel.rawValue)|\($0.locale)" })
            for (channel, byLocale) in stored.templates {
                for locale in byLocale.keys where !wanted.contains("\(channel.rawValue)|\(locale)") {
                    _ = try await tx.deleteTemplate(typeID: stored.id, channel: channel, locale: locale)
                }
            }
            for template in type.templates {
                try await tx.putTemplate(typeID: stored.id, channel: template.channel, locale: template.locale, content: template.content)
                summary.templates += 1
            }
            summary.types += 1
        }
        if let defaults = document.preferenceDefaults {
            let new = try await cells(.init(items: defaults), tx)
            try await replacing(try await tx.preferenceDefaults(), with: new, of: nil, tx) {
                try await tx.replacePreferenceDefaults(with: new)
            }
            summary.preferenceDefaults = defaults.count
        }
        if let digestTemplates = plan.digestTemplates {
            let wanted = Set(digestTemplates.map(\.locale))
            for stored in try await tx.digestTemplates() where !wanted.contains(stored.locale) {
                try await tx.deleteDigestTemplate(locale: stored.locale)
            }
            for template in digestTemplates {
                _ = try await tx.putDigestTemplate(locale: template.locale, content: template.content)
            }
            summary.digestTemplates = digestTemplates.count
        }
        return summary
    }
}

/// What `catalogue.import` records in the audit log.
private struct CatalogueSummary: Encodable {
    var categories = 0
    var types = 0
    var templates = 0
    var preferenceDefaults = 0
    var digestTemplates = 0

    enum CodingKeys: String, CodingKey {
        case categories, types, templates
        case preferenceDefaults = "preference_defaults"
        case digestTemplates = "digest_templates"
    }
}

/// A catalogue document validated before anything is written: keys, names, templates (they
/// must parse), locales, and no key named twice.
private struct CataloguePlan {
    struct CategoryItem { var key, name, description: String; var critical: Bool }
    struct TemplateItem { var channel: NotificationChannel; var locale: String; var content: TemplateContent }
    struct TypeItem { var categoryKey: String; var fields: NotificationTypeFields; var templates: [TemplateItem] }

    var categories: [CategoryItem] = []
    var types: [TypeItem] = []
    /// nil: the document leaves the digest templates as they are.
    var digestTemplates: [(locale: String, content: TemplateContent)]?

    init(_ document: Components.Schemas.Catalogue) throws {
        var categoryKeys = Set<String>()
        for (index, c) in document.categories.enumerated() {
            let field = "categories[\(index)]"
            let item = CategoryItem(
                key: try Validate.key(c.key, field: "\(field).key"), name: try Validate.text(c.name, field: "\(field).name"),
                description: c.description ?? "", critical: c.critical ?? false)
            guard categoryKeys.insert(item.key).inserted else {
                throw APIError.unprocessable(ValidationError(field: "\(field).key", message: "\"\(item.key)\" is named twice."))
            }
            categories.append(item)
        }
        var typeKeys = Set<String>()
        for (index, t) in document.types.enumerated() {
            let field = "types[\(index)]"
            let (key, name) = (try Validate.typeKey(t.key, field: "\(field).key"), try Validate.text(t.name, field: "\(field).name"))
            guard typeKeys.insert(key).inserted else {
                throw APIError.unprocessable(ValidationError(field: "\(field).key", message: "\"\(key)\" is named twice."))
            }
            var seen = Set<String>()
            let templates = try (t.templates ?? []).enumerated().map { n, template in
                let at = "\(field).templates[\(n)]"
                let content = TemplateContent(subject: template.subject ?? "", body: template.body, html: template.html)
                try content.validate(at: at)
                let locale = try Validate.locale(template.locale, field: "\(at).locale")
                let channel = mapped(template.channel, to: NotificationChannel.self)
                guard seen.insert("\(channel.rawValue)|\(locale)").inserted else {
                    throw APIError.unprocessable(ValidationError(field: at, message: "names \(channel.rawValue) in \(locale) twice."))
                }
                return TemplateItem(channel: channel, locale: locale, content: content)
            }
            let fields = NotificationTypeFields(
                key: key, categoryID: UUID(), name: name, description: t.description ?? "",
                defaultSeverity: t.defaultSeverity.map { mapped($0, to: Severity.self) } ?? .info,
                defaultPriority: t.defaultPriority.map { mapped($0, to: Priority.self) } ?? .normal,
                defaultChannels: (t.defaultChannels ?? [.inApp]).map { mapped($0, to: NotificationChannel.self) })
            types.append(TypeItem(categoryKey: t.category, fields: fields, templates: templates))
        }
        var locales = Set<String>()
        digestTemplates = try document.digestTemplates?.enumerated().map { index, template in
            let at = "digest_templates[\(index)]"
            let locale = try Validate.locale(template.locale, field: "\(at).locale")
            guard locales.insert(locale).inserted else {
                throw APIError.unprocessable(ValidationError(field: "\(at).locale", message: "\"\(locale)\" is named twice."))
            }
            let content = TemplateContent(subject: template.subject, body: template.body, html: template.html)
            try content.validateDigest(at: at)
            return (locale, content)
        }
    }
}
