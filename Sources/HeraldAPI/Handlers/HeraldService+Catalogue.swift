import Foundation
import HeraldCore
import HeraldStore
import Logging

extension HeraldService {
    // MARK: Categories

    func listCategories(_ input: Operations.ListCategories.Input) async throws -> Operations.ListCategories.Output {
        let categories = try await tenant { tx, _ in try await tx.categories() }
        return .ok(.init(body: .json(.init(items: categories.map(Components.Schemas.Category.init)))))
    }

    func getCategory(_ input: Operations.GetCategory.Input) async throws -> Operations.GetCategory.Output {
        let id = try id(input.path.categoryId, "category")
        let category = try await tenant { tx, _ in try await tx.category(id) }
        return .ok(.init(body: .json(.init(category))))
    }

    func createCategory(_ input: Operations.CreateCategory.Input) async throws -> Operations.CreateCategory.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let (key, name) = (try Validate.key(body.key), try Validate.text(body.name, field: "name"))
        let created = try await tenant { tx, _ in
            let category = Components.Schemas.Category(
                try await tx.createCategory(key: key, name: name, description: body.description ?? "", critical: body.critical ?? false))
            try await tx.audit(
                action: "category.create", targetType: "category", targetID: category.id, before: nil, after: try auditValue(category))
            return category
        }
        return .created(.init(body: .json(created)))
    }

    func updateCategory(_ input: Operations.UpdateCategory.Input) async throws -> Operations.UpdateCategory.Output {
        let id = try id(input.path.categoryId, "category")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        let name = try body.name.map { v in try Validate.text(v, field: "name") }
        let updated = try await tenant { tx, _ in
            let before = Components.Schemas.Category(try await tx.category(id))
            let after = Components.Schemas.Category(
                try await tx.updateCategory(id, name: name, description: body.description, critical: body.critical))
            try await tx.audit(
                action: "category.update", targetType: "category", targetID: after.id, before: try auditValue(before),
                after: try auditValue(after))
            return after
        }
        return .ok(.init(body: .json(updated)))
    }

    func deleteCategory(_ input: Operations.DeleteCategory.Input) async throws -> Operations.DeleteCategory.Output {
        let id = try id(input.path.categoryId, "category")
        try await tenant { tx, _ in
            let before = Components.Schemas.Category(try await tx.category(id))
            try await tx.deleteCategory(id)
            try await tx.audit(
                action: "category.delete", targetType: "category", targetID: before.id, before: try auditValue(before), after: nil)
        }
        return .noContent(.init())
    }

    // MARK: Notification types

    func listNotificationTypes(_ input: Operations.ListNotificationTypes.Input) async throws -> Operations.ListNotificationTypes.Output {
        let types = try await tenant { tx, _ in try await tx.notificationTypes() }
        return .ok(.init(body: .json(.init(items: try types.map(Components.Schemas.NotificationType.init)))))
    }

    func getNotificationType(_ input: Operations.GetNotificationType.Input) async throws -> Operations.GetNotificationType.Output {
        let id = try id(input.path.typeId, "notification type")
        let type = try await tenant { tx, _ in try await tx.notificationType(id) }
        return .ok(.init(body: .json(try .init(type))))
    }

    func createNotificationType(_ input: Operations.CreateNotificationType.Input) async throws -> Operations.CreateNotificationType.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let (key, name) = (try Validate.typeKey(body.key), try Validate.text(body.name, field: "name"))
        let created = try await tenant { tx, _ in
            let category = try await categoryID(key: body.category, tx)
            let fields = NotificationTypeFields(
                key: key, categoryID: category, name: name, description: body.description ?? "",
                defaultSeverity: body.defaultSeverity.map { mapped($0, to: Severity.self) } ?? .info,
                defaultPriority: body.defaultPriority.map { mapped($0, to: Priority.self) } ?? .normal,
                defaultChannels: (body.defaultChannels ?? [.inApp]).map { mapped($0, to: NotificationChannel.self) })
            let type = try Components.Schemas.NotificationType(try await tx.createNotificationType(fields))
            try await tx.audit(
                action: "notification_type.create", targetType: "notification_type", targetID: type.id, before: nil,
                after: try auditValue(type))
            return type
        }
        return .created(.init(body: .json(created)))
    }

    func updateNotificationType(_ input: Operations.UpdateNotificationType.Input) async throws -> Operations.UpdateNotificationType.Output {
        let id = try id(input.path.typeId, "notification type")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        try requireSomeChange(body)
        let name = try body.name.map { v in try Validate.text(v, field: "name") }
        let updated = try await tenant { tx, _ in
            let existing = try await tx.notificationType(id)
            var fields = NotificationTypeFields(
                key: existing.key, categoryID: existing.categoryID, name: name ?? existing.name,
                description: body.description ?? existing.description,
                defaultSeverity: body.defaultSeverity.map { mapped($0, to: Severity.self) } ?? existing.defaultSeverity,
                defaultPriority: body.defaultPriority.map { mapped($0, to: Priority.self) } ?? existing.defaultPriority,
                defaultChannels: body.defaultChannels.map { $0.map { mapped($0, to: NotificationChannel.self) } }
                    ?? existing.defaultChannels)
            if let category = body.category { fields.categoryID = try await categoryID(key: category, tx) }
            let after = try Components.Schemas.NotificationType(try await tx.updateNotificationType(id, fields))
            try await tx.audit(
                action: "notification_type.update", targetType: "notification_type", targetID: after.id,
                before: try auditValue(try Components.Schemas.NotificationType(existing)), after: try auditValue(after))
            return after
        }
        return .ok(.init(body: .json(updated)))
    }

    func deleteNotificationType(_ input: Operations.DeleteNotificationType.Input) async throws -> Operations.DeleteNotificationType.Output {
        let id = try id(input.path.typeId, "notification type")
        try await tenant { tx, _ in
            let before = try Components.Schemas.NotificationType(try await tx.notificationType(id))
            try await tx.deleteNotificationType(id)
            try await tx.audit(
                action: "notification_type.delete", targetType: "notification_type", targetID: before.id, before: try auditValue(before),
                after: nil)
        }
        return .noContent(.init())
    }

    func putTemplate(_ input: Operations.PutTemplate.Input) async throws -> Operations.PutTemplate.Output {
        let id = try id(input.path.typeId, "notification type")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let channel = mapped(input.path.channel, to: NotificationChannel.self)
        let content = TemplateContent(subject: body.subject ?? "", body: body.body, html: body.html)
        try content.validate(at: nil)
        let locale = try Validate.locale(input.path.locale)
        let updated = try await tenant { tx, _ in
            try await tx.putTemplate(typeID: id, channel: channel, locale: locale, content: content)
            try await tx.audit(
                action: "template.put", targetType: "notification_type", targetID: id.lowercased, before: nil,
                after: try auditValue(
                    Components.Schemas.Template(
                        channel: mapped(channel), locale: locale,
                        subject: content.subject, body: content.body, html: content.html)))
            return try Components.Schemas.NotificationType(try await tx.notificationType(id))
        }
        return .ok(.init(body: .json(updated)))
    }

    func deleteTemplate(_ input: Operations.DeleteTemplate.Input) async throws -> Operations.DeleteTemplate.Output {
        let id = try id(input.path.typeId, "notification type")
        let channel = mapped(input.path.channel, to: NotificationChannel.self)
        let locale = input.path.locale
        try await tenant { tx, _ in
            try await tx.deleteTemplate(typeID: id, channel: channel, locale: locale)
            try await tx.audit(
                action: "template.delete", targetType: "notification_type", targetID: id.lowercased,
                before: try auditValue(["channel": channel.rawValue, "locale": locale]), after: nil)
        }
        return .noContent(.init())
    }

    func previewTemplate(_ input: Operations.PreviewTemplate.Input) async throws -> Operations.PreviewTemplate.Output {
        let id = try id(input.path.typeId, "notification type")
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let channel = mapped(body.channel, to: NotificationChannel.self)
        let userID = try body.userId.map { v throws(ValidationError) in try Validate.uuid(v, field: "user_id") }
        let locale = try body.locale.map { v throws(ValidationError) in try Validate.locale(v) }
        let draft = body.template.map { TemplateContent(subject: $0.subject ?? "", body: $0.body, html: $0.html) }
        try draft?.validate(at: "template")
        let url = try body.url.map { v throws(ValidationError) in try Validate.linkURL(v, field: "url") }
        let format = body.format.map { EndpointFormat(rawValue: $0.rawValue) ?? .slack }
        let (planned, user) = try await tenant { tx, principal in
            // A user's name, address and attributes are what `users.read` shows: a key that may
            // only edit templates previews with the sample recipient.
            if userID != nil, !principal.permissions.contains(.usersRead) { throw APIError.forbidden(.usersRead) }
            let type = try await tx.notificationType(id)
            let request = EventRequest(
                typeKey: type.key, audience: Audience(), payload: try convert(body.payload ?? .init()),
                sourceActor: try body.actor.map { try convert($0) }, subjectType: body.subject?._type, subjectID: body.subject?.id,
                severity: body.severity.map { mapped($0, to: Severity.self) },
                priority: body.priority.map { mapped($0, to: Priority.self) },
                url: url)
            var user: User?
            if let userID {
                do { user = try await tx.user(userID) } catch StoreError.notFound {
                    throw APIError.unprocessable(ValidationError(field: "user_id", message: "is not a user of your organisation."))
                }
            }
            return (try await tx.previewInput(request, now: now()), user)
        }
        var planInput = planned
        let recipient = RecipientProfile(
            candidate: Candidate(userID: user?.id ?? UUID(), active: true), email: user?.email ?? "ada@example.com",
            displayName: user?.displayName ?? "Ada Lovelace", locale: locale ?? user?.locale, timezone: user?.timezone,
            attributes: user?.attributes ?? .object([:]))
        if let draft { planInput.type.templates[channel] = [recipient.locale ?? planInput.organisationLocale: draft] }
        let source = channel == .inApp ? .inApp : NotificationPlanner.templateChannel(planInput, for: channel)
        let picked = TemplateRenderer.pick(
            planInput.type.templates[source] ?? [:], userLocale: recipient.locale, organisationLocale: planInput.organisationLocale)
        let content: TemplateContent
        if channel == .inApp {
            content = NotificationPlanner.inAppContent(planInput, recipient)
        } else {
            // The workers' links are signed per delivery; a preview shows where they go.
            var links: [String: String] = [:]
            if url != nil { links["open"] = "https://herald.invalid/v1/links/preview" }
            if channel == .email { links["unsubscribe"] = "https://herald.invalid/v1/unsubscribe/preview" }
            content = NotificationPlanner.outboxContent(
                planInput, recipient, channel: channel, links: links, escaping: .of(channel, format: format))
        }
        return .ok(
            .init(
                body: .json(
                    .init(
                        channel: body.channel,
                        template: .init(channel: picked.map { _ in mapped(source) }, locale: picked?.locale, draft: draft != nil),
                        recipient: .init(
                            userId: user?.id.lowercased, displayName: recipient.displayName, email: recipient.email,
                            locale: recipient.locale ?? planInput.organisationLocale,
                            timezone: recipient.timezone ?? planInput.organisationTimezone),
                        subject: content.subject, body: content.body, html: channel == .email ? content.html : nil))))
    }

    /// A category named by key in a request body; an unknown key is a 422.
    func categoryID(key: String, _ tx: TenantTransaction) async throws -> UUID {
        guard let category = try await tx.category(key: key) else {
            throw APIError.unprocessable(ValidationError(field: "category", message: "\"\(key)\" is not a category of your organisation."))
        }
        return category.id
    }
}

extension TemplateContent {
    /// Every part of the template parses (422 naming the part, under `at` when given).
    func validate(at prefix: String?) throws(ValidationError) {
        let field = { (part: String) in prefix.map { "\($0).\(part)" } ?? part }
        try TemplateRenderer.validate(subject, field: field("subject"))
        try TemplateRenderer.validate(body, field: field("body"))
        if let html { try TemplateRenderer.validate(html, field: field("html")) }
    }

    /// A digest template: `validate(at:)`, and neither subject nor text blank (the contract's
    /// minLength 1, and blank is no better: a digest with no subject or no text).
    func validateDigest(at prefix: String?) throws(ValidationError) {
        for (part, value) in [("subject", subject), ("body", body)] where value.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty {
            throw ValidationError(field: prefix.map { "\($0).\(part)" } ?? part, message: "must not be blank.")
        }
        try validate(at: prefix)
    }
}

// The digest email's templates (issue 11): one per locale, Mustache, with a built-in default.
extension HeraldService {
    func listDigestTemplates(_ input: Operations.ListDigestTemplates.Input) async throws -> Operations.ListDigestTemplates.Output {
        let templates = try await tenant { tx, _ in try await tx.digestTemplates() }
        return .ok(
            .init(
                body: .json(
                    .init(
                        items: templates.map(Components.Schemas.DigestTemplate.init),
                        _default: .init(locale: "default", content: DigestTemplate.builtIn, updatedAt: nil)))))
    }

    func getDigestTemplate(_ input: Operations.GetDigestTemplate.Input) async throws -> Operations.GetDigestTemplate.Output {
        let locale = try Validate.locale(input.path.locale)
        guard let record = try await tenant({ tx, _ in try await tx.digestTemplate(locale: locale) }) else {
            throw APIError.notFound(resource: "digest template")
        }
        return .ok(.init(body: .json(.init(record))))
    }

    func putDigestTemplate(_ input: Operations.PutDigestTemplate.Input) async throws -> Operations.PutDigestTemplate.Output {
        guard case .json(let body) = input.body else { throw APIError.badRequest("Send a JSON body.") }
        let locale = try Validate.locale(input.path.locale)
        let content = TemplateContent(subject: body.subject, body: body.body, html: body.html)
        try content.validateDigest(at: nil)
        let saved = try await tenant { tx, _ in
            let record = try await tx.putDigestTemplate(locale: locale, content: content)
            try await tx.audit(
                action: "digest_template.put", targetType: "digest_template", targetID: locale, before: nil,
                after: try auditValue(Components.Schemas.DigestTemplate(record)))
            return record
        }
        return .ok(.init(body: .json(.init(saved))))
    }

    func deleteDigestTemplate(_ input: Operations.DeleteDigestTemplate.Input) async throws -> Operations.DeleteDigestTemplate.Output {
        let locale = try Validate.locale(input.path.locale)
        try await tenant { tx, _ in
            try await tx.deleteDigestTemplate(locale: locale)
            try await tx.audit(action: "digest_template.delete", targetType: "digest_template", targetID: locale, before: nil, after: nil)
        }
        return .noContent(.init())
    }
}

extension Components.Schemas.DigestTemplate {
    init(_ record: DigestTemplateRecord) {
        self.init(locale: record.locale, content: record.content, updatedAt: record.updatedAt)
    }

    init(locale: String, content: TemplateContent, updatedAt: Date?) {
        self.init(locale: locale, subject: content.subject, body: content.body, html: content.html, updatedAt: updatedAt)
    }
}
