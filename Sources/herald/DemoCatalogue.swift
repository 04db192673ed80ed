import Foundation
import HeraldCore
import HeraldStore

/// The demo organisation's catalogue, covering the brief's use cases: medical alerts, club
/// outings (opt-in, digest, conditions) and CRM events. Safe to run again.
enum DemoCatalogue {
    struct TypeSeed {
        var key: String
        var category: String
        var name: String
        var severity: Severity
        var priority: Priority
        var channels: [NotificationChannel]
        var templates: [(NotificationChannel, String, TemplateContent)]
    }

    static let categories: [(key: String, name: String, description: String, critical: Bool)] = [
        ("alerts", "Alerts", "Clinical alerts; always shown in-app.", true),
        ("outings", "Outings", "New club outings (opt-in).", false),
        ("activity", "Activity", "Tasks, mentions and documents.", false),
        ("system", "System", "Announcements from the administrators.", false),
    ]

    static let types: [TypeSeed] = [
        TypeSeed(
            key: "ISQ_CRITICAL", category: "alerts", name: "Critical implant stability reading", severity: .critical, priority: .critical,
            channels: [.inApp, .email],
            templates: [
                (
                    .inApp, "en",
                    TemplateContent(
                        subject: "Critical ISQ {{payload.isq}}",
                        body: "Implant {{payload.implant}}: stability {{payload.isq}} is below the threshold of {{payload.threshold}}.")
                ),
                (
                    .inApp, "fr",
                    TemplateContent(
                        subject: "ISQ critique {{payload.isq}}",
                        body: "Implant {{payload.implant}} : stabilité {{payload.isq}} sous le seuil de {{payload.threshold}}.")
                ),
                (
                    .email, "en",
                    TemplateContent(
                        subject: "Critical implant stability reading",
                        body:
                            "Hello {{recipient.display_name}},\n\nA reading of {{payload.isq}} needs your attention. Open Herald to see it."
                            + "{{#links.open}}\n\nOpen the reading: {{links.open}}{{/links.open}}"
                            + "{{#links.unsubscribe}}\n\nStop these emails: {{links.unsubscribe}}{{/links.unsubscribe}}",
                        html: "<p>Hello {{recipient.display_name}},</p><p>A reading of <b>{{payload.isq}}</b> needs your attention.</p>"
                            + "{{#links.open}}<p><a href=\"{{links.open}}\">Open the reading</a></p>{{/links.open}}"
                            + "{{#links.unsubscribe}}<p><a href=\"{{links.unsubscribe}}\">Stop these emails</a></p>{{/links.unsubscribe}}")
                ),
            ]),
        TypeSeed(
            key: "OUTING_PUBLISHED", category: "outings", name: "New outing", severity: .info, priority: .normal,
            channels: [.inApp],
            templates: [
                (
                    .inApp, "en",
                    TemplateContent(
                        subject: "New outing: {{payload.title}}", body: "{{payload.activity}} on {{payload.starts_on}} with {{actor.name}}."
                    )
                ),
                (
                    .email, "en",
                    TemplateContent(
                        subject: "New outing: {{payload.title}}",
                        body: "{{payload.activity}} on {{payload.starts_on}}."
                            + "{{#links.unsubscribe}}\n\nStop these emails: {{links.unsubscribe}}{{/links.unsubscribe}}")
                ),
            ]),
        TypeSeed(
            key: "TASK_ASSIGNED", category: "activity", name: "Task assigned", severity: .info, priority: .normal,
            channels: [.inApp],
            templates: [
                (.inApp, "en", TemplateContent(subject: "{{actor.name}} assigned you: {{payload.title}}", body: "Due {{payload.due}}."))
            ]),
        TypeSeed(
            key: "MENTION", category: "activity", name: "Mention", severity: .info, priority: .high,
            channels: [.inApp, .email],
            templates: [(.inApp, "en", TemplateContent(subject: "{{actor.name}} mentioned you", body: "{{payload.excerpt}}"))]),
        TypeSeed(
            key: "DOCUMENT_EXPIRING", category: "activity", name: "Document expiring", severity: .warning, priority: .high,
            channels: [.inApp, .email],
            templates: [(.inApp, "en", TemplateContent(subject: "{{payload.document}} expires on {{payload.expires_on}}", body: ""))]),
        TypeSeed(
            key: "SYSTEM_ANNOUNCEMENT", category: "system", name: "System announcement", severity: .info, priority: .low,
            channels: [.inApp], templates: [(.inApp, "en", TemplateContent(subject: "{{payload.title}}", body: "{{payload.message}}"))]),
    ]

    /// Creates what is missing; returns how many types the catalogue has. The clinicians get the
    /// `clinician` role; outings are opt-in (off by default for email, in-app on).
    static func ensure(_ tx: TenantTransaction, clinicians: [UUID]) async throws -> Int {
        var categoryIDs: [String: UUID] = [:]
        for c in categories {
            if let existing = try await tx.category(key: c.key) {
                categoryIDs[c.key] = existing.id
            } else {
                categoryIDs[c.key] = try await tx.createCategory(key: c.key, name: c.name, description: c.description, critical: c.critical)
                    .id
            }
        }
        for t in types {
            guard let categoryID = categoryIDs[t.category] else { continue }
            var type = try await tx.notificationType(key: t.key)
            if type == nil {
                type = try await tx.createNotificationType(
                    NotificationTypeFields(
                        key: t.key, categoryID: categoryID, name: t.name, description: "", defaultSeverity: t.severity,
                        defaultPriority: t.priority, defaultChannels: t.channels))
            }
            guard let type else { continue }
            for (channel, locale, content) in t.templates {
                try await tx.putTemplate(typeID: type.id, channel: channel, locale: locale, content: content)
            }
        }
        if let outings = categoryIDs["outings"] {
            try await tx.replacePreferenceDefaults(with: [
                PreferenceCell(categoryID: outings, channel: .email, setting: PreferenceSetting(enabled: false, frequency: .none))
            ])
        }
        let roles = try await tx.roles()
        var clinician = roles.first { $0.key == "clinician" }
        if clinician == nil {
            clinician = try await tx.createRole(
                key: "clinician", name: "Clinician", description: "Receives clinical alerts.", permissions: [.notificationsRead])
        }
        guard let clinician else { return types.count }
        for user in clinicians {
            let current = try await tx.user(user).roles.map(\.id)
            if !current.contains(clinician.id) { _ = try await tx.setUserRoles(user, current + [clinician.id]) }
        }
        return types.count
    }
}
