import Logging
import PostgresNIO
import ServiceLifecycle

/// Stops the process when its database role is not the one its command needs, once the database
/// answers (an operator's trial: `serve` connected as the schema's owner started without a word,
/// though row-level security then rests on its goodwill; a worker connected as the application
/// role logged "permission denied" for every claim, forever, while its `/healthz` said ok).
/// Until the database answers, readiness says so; the check waits and tries again.
struct DatabaseRoleCheck: Service {
    enum Needs: Sendable {
        /// `serve`: a role that owns nothing and does not bypass row-level security.
        case application
        /// `worker`: the same, and allowed to run the claim functions.
        case worker
    }

    let client: PostgresClient
    let needs: Needs
    /// The setting that chose the role (`DATABASE_URL`, `DATABASE_WORKER_URL`).
    let variable: String
    let logger: Logger

    struct WrongRole: Error, CustomStringConvertible {
        var description: String
    }

    func run() async throws {
        while !Task.isCancelled {
            let verdict: String??
            do { verdict = try await problem() } catch {
                // Not reachable yet (readiness and the pool say why): try again shortly.
                try? await Task.sleep(for: .seconds(5))
                continue
            }
            // nil: the claim functions are not there yet (migrations to come); try again.
            guard let verdict else {
                try? await Task.sleep(for: .seconds(5))
                continue
            }
            if let problem = verdict {
                logger.critical(
                    "the database role is wrong for this command; stopping", metadata: ["variable": "\(variable)", "problem": "\(problem)"])
                throw WrongRole(description: "\(variable) \(problem)")
            }
            break
        }
        // Checked: nothing more to do until the process stops.
        try? await gracefulShutdown()
    }

    /// `.some(nil)` when the role is right, `.some(why)` when not, nil when the answer must wait
    /// for migrations.
    private func problem() async throws -> String?? {
        let rows = try await client.query(
            """
            SELECT current_user::text, r.rolsuper, r.rolbypassrls,
                   EXISTS (SELECT 1 FROM pg_class c WHERE c.relowner = r.oid AND c.relnamespace = 'public'::regnamespace),
                   (SELECT count(*)::int FROM pg_proc p
                    WHERE p.pronamespace = 'public'::regnamespace AND p.proname IN ('claim_deliveries', 'claim_digest_runs', 'claim_jobs')),
                   (SELECT coalesce(bool_and(has_function_privilege(p.oid, 'EXECUTE')), false) FROM pg_proc p
                    WHERE p.pronamespace = 'public'::regnamespace AND p.proname IN ('claim_deliveries', 'claim_digest_runs', 'claim_jobs'))
            FROM pg_roles r WHERE r.rolname = current_user
            """, logger: logger)
        var user = "", superuser = false, bypasses = false, owns = false, functions = 0, claims = false
        for try await (u, s, b, o, f, c) in rows.decode((String, Bool, Bool, Bool, Int, Bool).self) {
            (user, superuser, bypasses, owns, functions, claims) = (u, s, b, o, f, c)
        }
        let expected = needs == .worker ? "herald_worker" : "herald_app"
        if superuser || bypasses {
            return .some(
                "connects as \(user), which bypasses row-level security: every organisation's rows are open to it. Connect as \(expected).")
        }
        if owns {
            return .some(
                "connects as \(user), which owns the schema (the migrations' role): it can switch row-level security off. Connect as \(expected)."
            )
        }
        guard needs == .worker else { return .some(nil) }
        if functions < 3 { return nil }
        if !claims {
            return .some(
                "connects as \(user), which may not claim work (claim_deliveries, claim_digest_runs, claim_jobs): the workers would fail every claim. Connect as herald_worker."
            )
        }
        return .some(nil)
    }
}
