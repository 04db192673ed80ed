import Foundation
import HeraldCore
import HeraldStore
import Logging

// Domain values → the generated API schemas. The only place that knows both shapes.

extension Components.Schemas.Organisation {
    init(_ o: Organisation) {
        self.init(
            id: o.id.lowercased, slug: o.slug, name: o.name, defaultLocale: o.defaultLocale,
            defaultTimezone: o.defaultTimezone, throttlePerMinute: o.throttlePerMinute,
            userThrottlePerMinute: o.userThrottlePerMinute, emailFrom: o.emailFrom,
            emailFromName: o.emailFromName, emailReplyTo: o.emailReplyTo, createdAt: o.createdAt, updatedAt: o.updatedAt)
    }
}

extension Components.Schemas.User {
    init(_ u: User) throws {
        self.init(
            id: u.id.lowercased, email: u.email, displayName: u.displayName, locale: u.locale, timezone: u.timezone,
            active: u.active, attributes: try decodeJSON(u.attributesJSON),
            roles: u.roles.map { .init(id: $0.id.lowercased, key: $0.key) }, createdAt: u.createdAt, updatedAt: u.updatedAt)
    }
}

extension Components.Schemas.Role {
    init(_ r: Role) {
        self.init(
            id: r.id.lowercased, key: r.key, name: r.name, description: r.description, builtin: r.builtin,
            permissions: r.permissions.sorted().map(\.rawValue), createdAt: r.createdAt, updatedAt: r.updatedAt)
    }
}

extension Components.Schemas.Group {
    init(_ g: Group) {
        self.init(
            id: g.id.lowercased, key: g.key, name: g.name, description: g.description, memberCount: g.memberCount,
            createdAt: g.createdAt, updatedAt: g.updatedAt)
    }
}

extension Components.Schemas.ApiKey {
    init(_ k: ApiKey, organisationID: UUID) {
        self.init(
            id: k.id.lowercased, name: k.name, roleId: k.roleID.lowercased,
            prefix: OpaqueToken.prefix(kind: .apiKey, organisationID: organisationID, id: k.id),
            createdAt: k.createdAt, lastUsedAt: k.lastUsedAt, expiresAt: k.expiresAt, revokedAt: k.revokedAt)
    }
}

extension Components.Schemas.AuditEntry {
    init(_ e: AuditEntry) throws {
        self.init(
            id: e.id.lowercased, occurredAt: e.occurredAt,
            actorType: try mapped(stored: e.actorType), actorId: e.actorID?.lowercased,
            action: e.action, targetType: e.targetType, targetId: e.targetID,
            before: try e.beforeJSON.map { try decodeJSON($0) }, after: try e.afterJSON.map { try decodeJSON($0) },
            requestId: e.requestID)
    }
}

extension Components.Schemas.Category {
    init(_ c: HeraldStore.Category) {
        self.init(
            id: c.id.lowercased, key: c.key, name: c.name, description: c.description, critical: c.critical,
            createdAt: c.createdAt, updatedAt: c.updatedAt)
    }
}

extension Components.Schemas.NotificationType {
    init(_ t: HeraldStore.NotificationType) throws {
        let templates = try t.templates.sorted { $0.key < $1.key }.flatMap { channel, byLocale in
            try byLocale.sorted { $0.key < $1.key }.map { locale, content in
                Components.Schemas.Template(
                    channel: try mapped(channel), locale: locale, subject: content.subject,
                    body: content.body, html: content.html)
            }
        }
        self.init(
            id: t.id.lowercased, key: t.key, category: t.categoryKey, name: t.name, description: t.description,
            defaultSeverity: try mapped(t.defaultSeverity), defaultPriority: try mapped(t.defaultPriority),
            defaultChannels: try t.defaultChannels.map { try mapped($0) }, templates: templates,
            createdAt: t.createdAt, updatedAt: t.updatedAt)
    }
}

/// Re-reads a value of one Codable shape as another with the same JSON (API schema ↔ core type).
func convert<T: Decodable>(_ value: some Encodable, to type: T.Type = T.self) throws -> T {
    try JSONDecoder().decode(T.self, from: try JSONEncoder().encode(value))
}

/// A stored value the API has no word for. It is this server's fault, never the client's: the
/// request fails with a logged 500 and the process goes on.
struct UnmappableValue: Error, CustomStringConvertible {
    var type: String
    var value: String
    var description: String { "no \(type) case for the stored value \"\(value)\"" }
}

/// One string vocabulary to another with the same words (store ↔ generated API schema).
func mapped<Target: RawRepresentable>(_ value: some RawRepresentable<String>, to: Target.Type = Target.self) throws -> Target
where Target.RawValue == String {
    try mapped(stored: value.rawValue)
}

/// A word read from the database into a vocabulary type.
func mapped<Target: RawRepresentable>(stored value: String, to: Target.Type = Target.self) throws -> Target
where Target.RawValue == String {
    guard let target = Target(rawValue: value) else { throw UnmappableValue(type: "\(Target.self)", value: value) }
    return target
}
