import Foundation
import HTTPTypes
import HeraldCore
import HeraldStore
import Logging

/// Every error the API answers with. Each knows its status, its RFC 9457 type and how loudly
/// to log it; `ProblemMiddleware` turns it into `application/problem+json` at one boundary.
public enum APIError: Error, Sendable, Equatable {
    case badRequest(String)
    case unauthorized(String)
    case forbidden(Permission)
    /// The caller has the operation's permission, but not one that the change would give away,
    /// take away or act on (`requireHolds`: no privilege escalation).
    case notHeld(Permission)
    /// A browser's preflight from an origin `HERALD_CORS_ORIGINS` does not list.
    case originNotAllowed(String)
    /// The caller may call the operation, but what it proved does not hold (a wrong current
    /// password): 403 with `detail`.
    case refused(String)
    case notFound(resource: String)
    case noRoute(method: String, path: String)
    /// The path exists with other methods (RFC 9110 §15.5.6: 405 with `Allow`).
    case methodNotAllowed(method: String, allowed: [String])
    case conflict(String)
    case unprocessable(ValidationError)
    case tooManyRequests(String, retryAfter: Int)
    /// The organisation's request rate on this instance is used up (`RateLimiter`).
    case rateLimited(RateLimitDecision)
    case contentTooLarge(limit: Int?)
    /// A body in a media type the operation does not take (RFC 9110 §15.5.16).
    case unsupportedMediaType(String)
    case notReady(String)
    case internalError

    /// PostgreSQL cannot be reached or used just now (`DatabaseWords.isUnavailable`).
    static let databaseUnavailable = APIError.notReady(
        "Herald cannot reach its database just now; retry in a few seconds (with the same Idempotency-Key for an event).")

    /// A type key the organisation's catalogue does not have, named by `field`.
    static func unknownType(_ key: String, field: String) -> APIError {
        .unprocessable(ValidationError(field: field, message: "\"\(key)\" is not a notification type of your organisation."))
    }

    var status: HTTPResponse.Status {
        switch self {
        case .badRequest: .badRequest
        case .unauthorized: .unauthorized
        case .forbidden, .notHeld, .originNotAllowed, .refused: .forbidden
        case .notFound, .noRoute: .notFound
        case .methodNotAllowed: .methodNotAllowed
        case .conflict: .conflict
        case .unprocessable: .unprocessableContent
        case .tooManyRequests, .rateLimited: .tooManyRequests
        case .contentTooLarge: .contentTooLarge
        case .unsupportedMediaType: .unsupportedMediaType
        case .notReady: .serviceUnavailable
        case .internalError: .internalServerError
        }
    }

    var problemType: String {
        let slug =
            switch self {
            case .badRequest: "bad-request"
            case .unauthorized: "unauthorized"
            case .forbidden, .notHeld, .originNotAllowed, .refused: "forbidden"
            case .notFound, .noRoute: "not-found"
            case .methodNotAllowed: "method-not-allowed"
            case .conflict: "conflict"
            case .unprocessable: "validation"
            case .tooManyRequests, .rateLimited: "rate-limited"
            case .contentTooLarge: "content-too-large"
            case .unsupportedMediaType: "unsupported-media-type"
            case .notReady: "not-ready"
            case .internalError: "internal"
            }
        return "https://herald.dev/problems/\(slug)"
    }

    var detail: String {
        switch self {
        case .badRequest(let detail), .unauthorized(let detail), .conflict(let detail), .notReady(let detail),
            .unsupportedMediaType(let detail), .refused(let detail):
            detail
        case .notHeld(let permission):
            "This change concerns the permission \"\(permission.rawValue)\", which you do not hold: you can only grant, take away "
                + "or act on what you hold yourself (a role with it, a user who holds it, a key of such a role)."
        case .forbidden(let permission):
            "This operation needs the permission \"\(permission.rawValue)\"."
        case .notFound(let resource):
            // Never echo the id: another organisation's id must answer byte for byte like a missing one.
            // A digest template is named by its locale, not an id.
            switch resource {
            case "digest template":
                "Your organisation has no digest template of this locale; its recipients get the next locale of their fallback, or the built-in default (GET /v1/digest-templates lists both)."
            case "template": "This notification type has no template of this channel and locale."
            // A signed link is answered on a public route, with no organisation in sight.
            case "link": "This link is not valid, or has expired or been used up."
            default: "No \(resource) with this id exists in your organisation."
            }
        case .originNotAllowed(let origin):
            "Pages of \(origin) may not call this API: the origins that may are listed in the server's HERALD_CORS_ORIGINS."
        case .noRoute(let method, let path):
            "There is no operation \(method) \(path); openapi.yaml lists them."
        case .methodNotAllowed(let method, let allowed):
            "This path does not take \(method); it takes \(allowed.joined(separator: ", "))."
        case .unprocessable(let error):
            "\(error.field): \(error.message)"
        case .tooManyRequests(let detail, _):
            detail
        case .rateLimited(let decision):
            decision.policy.name == "events"
                ? "Your organisation sends more than \(decision.policy.rateText(of: "event")) per second to this instance; retry after \(decision.retryAfter) s."
                : "Your organisation makes more than \(decision.policy.rateText(of: "request")) per second to this instance; retry after \(decision.retryAfter) s."
        case .contentTooLarge(let limit):
            limit.map { "The request body is larger than \($0) bytes." } ?? "The request body is too large."
        case .internalError:
            "Something went wrong on our side. The request id in the X-Request-Id header helps us find it."
        }
    }

    var logLevel: Logger.Level {
        switch self {
        case .internalError: .error
        // Expected while PostgreSQL is away or the instance stops; the operator's alert is readiness.
        case .notReady: .warning
        case .unauthorized, .forbidden, .notHeld, .originNotAllowed, .refused, .tooManyRequests, .rateLimited: .notice
        default: .debug
        }
    }

    var headers: HTTPFields {
        var fields: HTTPFields = [.contentType: "application/problem+json"]
        switch self {
        case .unauthorized: fields[.wwwAuthenticate] = "Bearer"
        case .tooManyRequests(_, let seconds): fields[.retryAfter] = String(seconds)
        case .notReady: fields[.retryAfter] = "5"
        case .rateLimited(let decision):
            fields[.retryAfter] = String(max(1, decision.retryAfter))
            fields.append(contentsOf: decision.headers)
        case .methodNotAllowed(_, let allowed): fields[.allow] = allowed.joined(separator: ", ")
        default: break
        }
        return fields
    }

    /// The RFC 9457 body, keys in a fixed order so equal problems are equal bytes.
    var body: Data {
        let title = status.reasonPhrase
        return Data(
            "{\"type\":\(jsonQuoted(problemType)),\"title\":\(jsonQuoted(title)),\"status\":\(status.code),\"detail\":\(jsonQuoted(detail))}"
                .utf8)
    }

    /// Maps store errors to API errors: the store says what was missing or which constraint
    /// refused, this table says it in the client's words.
    static func from(_ error: StoreError) -> APIError {
        switch error {
        case .notFound(let resource):
            return .notFound(resource: resource)
        case .unknownReference(let field, let resource):
            return .unprocessable(ValidationError(field: field, message: "names a \(resource) that does not exist in your organisation."))
        case .conflict(let constraint):
            return .conflict(conflictMessages[constraint] ?? "This change conflicts with an existing \(resource(of: constraint)).")
        case .invalidReference(let constraint):
            return .unprocessable(
                ValidationError(
                    field: referenceFields[constraint] ?? "body", message: "refers to something that does not exist in your organisation."))
        case .stillReferenced(let constraint):
            return .conflict(
                stillReferencedMessages[constraint] ?? "Other data still refers to this \(resource(of: constraint)); remove it first.")
        case .inUse(let sentence):
            return .conflict(sentence)
        case .checkViolation(let constraint):
            return .unprocessable(ValidationError(field: constraint, message: "has a value Herald does not accept."))
        }
    }

    /// The resource a constraint belongs to, from its table (constraint names start with it).
    private static func resource(of constraint: String) -> String {
        let tables = [
            ("notification_types", "notification type"), ("api_keys", "API key"), ("categories", "category"),
            ("organisations", "organisation"), ("endpoints", "endpoint"), ("templates", "template"),
            ("groups", "group"), ("roles", "role"), ("users", "user"), ("events", "event"),
        ]
        return tables.first { constraint.hasPrefix($0.0) }?.1 ?? "record"
    }

    // Constraint names as sql/migrations/0007_citus_ready.sql gives them (users_email is an index).
    private static let conflictMessages = [
        "users_email": "A user with this email already exists in your organisation.",
        "roles_key_unique": "A role with this key already exists in your organisation.",
        "groups_key_unique": "A group with this key already exists in your organisation.",
        "organisations_slug_unique": "An organisation with this slug already exists.",
    ]

    /// A delete refused because this (foreign key or rule) still refers to the row.
    private static let stillReferencedMessages = [
        "api_keys_role_id_fk": "A live API key holds this role; revoke the key first.",
        "notifications_category": "Notification types or in-app notifications still use this category; move or delete them first.",
        "notification_types_category_id_fk":
            "Notification types or in-app notifications still use this category; move or delete them first.",
        "events_type_id_fk": "Events of this type exist; a type with history cannot be deleted.",
    ]

    private static let referenceFields = [
        "user_roles_role_id_fk": "role_ids",
        "api_keys_role_id_fk": "role_id",
    ]
}
