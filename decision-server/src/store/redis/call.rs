//! One call of Tollgate's Lua on Redis: its keys and arguments, sent as `FCALL` of the
//! customer library's function or as `EVALSHA` of a small script, and the code loaded into
//! Redis when Redis answers that it does not have it (a fresh or restarted node, a failover,
//! a Cluster node that joined), then the call sent once more.

use redis::{Cmd, ErrorKind, RedisError, RedisResult, ServerErrorKind, ToRedisArgs, Value};

/// Code Redis runs.
#[derive(Debug, Clone)]
pub enum Code {
    /// A function library (the customer library, `script::LIBRARY`): the function calls name,
    /// and the library's source to load.
    Library {
        function: &'static str,
        source: &'static str,
    },
    /// A small script of its own (the shared admin changes, the close relay).
    Script(redis::Script),
}

impl Code {
    /// A call with no keys or arguments yet.
    pub fn call(&self) -> Call<'_> {
        Call {
            code: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One call's keys and arguments, built as `redis::ScriptInvocation` builds them.
#[derive(Debug)]
pub struct Call<'a> {
    code: &'a Code,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call<'_> {
    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn cmd(&self) -> Cmd {
        let mut cmd = match self.code {
            Code::Library { function, .. } => {
                let mut c = redis::cmd("FCALL");
                c.arg(*function);
                c
            }
            Code::Script(s) => {
                let mut c = redis::cmd("EVALSHA");
                c.arg(s.get_hash());
                c
            }
        };
        cmd.arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k.as_slice());
        }
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
        cmd
    }

    /// Whether `e` says Redis does not have this call's code.
    fn code_missing(&self, e: &RedisError) -> bool {
        match self.code {
            Code::Library { .. } => {
                e.detail()
                    .is_some_and(|d| d.starts_with("Function not found"))
                    || e.to_string().contains("Function not found")
            }
            Code::Script(_) => e.kind() == ErrorKind::Server(ServerErrorKind::NoScript),
        }
    }

    /// Runs the call; if Redis lacks the code, loads it (on a Cluster, on every primary) and
    /// runs the call once more.
    pub async fn run<C: redis::aio::ConnectionLike>(&self, con: &mut C) -> RedisResult<Value> {
        match self.cmd().query_async::<Value>(con).await {
            Err(e) if self.code_missing(&e) => {
                match self.code {
                    Code::Library { source, .. } => {
                        redis::cmd("FUNCTION")
                            .arg("LOAD")
                            .arg("REPLACE")
                            .arg(*source)
                            .query_async::<Value>(con)
                            .await?;
                    }
                    Code::Script(s) => {
                        s.load_async(con).await?;
                    }
                }
                self.cmd().query_async::<Value>(con).await
            }
            other => other,
        }
    }
}
